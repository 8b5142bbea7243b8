"""GPU invariants the CPU can check, in the processes a run starts: no process that runs a cell or a
rank is a bad fork, and the parent of a run never initialises CUDA (lorabench/forksafe.py,
lorabench/child.py). torch's bad-fork flag is readable on a CPU build: a process forked after its
parent asked CUDA anything carries it. (Each test starts Python afresh: the slow tier.)"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import rows_in

# A cell process as `runner` starts one through `worker` (the fork server preloaded with what a BERT LoRA cell needs,
# peft included), which then forks two processes as `processes.launch` does for a cell of two.
CELL_AND_RANKS = textwrap.dedent("""
    import json, multiprocessing as mp, sys
    from lorabench import forksafe
    from lorabench.run import processes, worker
    from lorabench.plan.cells import Cell
    from lorabench.results.measured import Measured
    from lorabench.results.rows import Status

    def member(conn):
        conn.send(("result", Measured(Status.OK, env_facts={"bad_fork": forksafe.in_bad_fork()})))

    def cell(conn):
        forksafe.keep_out()   # as worker.cell_main does
        results = processes.launch(2, member)
        conn.send({"cell": forksafe.in_bad_fork(), "ranks": [r.measured.env_facts["bad_fork"] for r in results]})

    if __name__ == "__main__":
        method = sys.argv[1]
        worker.start_workers(method, [Cell(model="bert-tiny", method="lora", rank=8)])
        assert method == "spawn" or "lorabench.run.preload_hf" in worker.PRELOAD_HF
        ctx = mp.get_context(method)
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=cell, args=(send,))
        p.start()
        print(json.dumps(recv.recv()))
        p.join()
""")


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_cell_process_and_its_forked_ranks_are_not_in_a_bad_fork(method, tmp_path):
    script = tmp_path / "cell_and_ranks.py"
    script.write_text(CELL_AND_RANKS)
    out = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"cell": False, "ranks": [False, False]}


def test_the_bad_fork_check_sees_a_fork_after_a_cuda_query():
    """The control: the flag the tests above read is set when it must be (a fork after device_count)."""
    script = textwrap.dedent("""
        import multiprocessing as mp, torch
        from lorabench import forksafe
        def child(conn):
            conn.send(forksafe.in_bad_fork())
        if __name__ == "__main__":
            torch.cuda.device_count()   # asks the CUDA runtime (no driver here: it answers 0, and poisons forks)
            ctx = mp.get_context("fork")
            recv, send = ctx.Pipe(duplex=False)
            ctx.Process(target=child, args=(send,)).start()
            print(recv.recv())
    """)
    if torch.version.cuda is None and torch.version.hip is None:
        pytest.skip("a CPU-only build of torch has no CUDA runtime to poison a fork with")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]


PARENT = textwrap.dedent("""
    import json, sys, torch
    inits = []
    torch.cuda.is_available = lambda: True   # a GPU that looks visible
    torch.cuda.device_count = lambda: 1
    torch.cuda._lazy_init = lambda: inits.append("torch.cuda._lazy_init")
    from lorabench.cli import main
    code = main(sys.argv[1:])
    print(json.dumps({"code": code, "inits": inits, "initialized": torch.cuda.is_initialized(),
                      "bitsandbytes": sys.modules.get("bitsandbytes") is not None}))
""")


def test_a_gpu_run_never_initialises_cuda_in_the_parent(tmp_path):
    """A run on a GPU that looks visible (is_available, device_count), with precisions and a
    quantisation to probe, in a fresh process as a user starts it: every CUDA tensor and device
    query passes through torch.cuda._lazy_init, which must never run there, and bitsandbytes (whose
    import initialises CUDA on a GPU host) is never imported there. The cells, the probes and the
    calibration run in children, where no GPU exists: they fail or skip, and the run reports it."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            PARENT,
            "run",
            "--device",
            "cuda",
            "--models",
            "tiny-llama",  # the zoo's smallest: BOFT's survey steps the model for real (cifar-mlp: ~10 s a cell)
            "--methods",
            "lora,boft",
            "--ranks",
            "2",
            "--precision",
            "fp32,bf16-mixed",
            "--quantize",
            "none,nf4",
            "--samples",
            "16",
            "--eval-samples",
            "8",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--progress",
            "off",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    parent = json.loads(out.stdout.strip().splitlines()[-1])
    assert parent == {"code": 0, "inits": [], "initialized": False, "bitsandbytes": False}, out.stderr[-3000:]
    rows = rows_in(tmp_path)
    assert len(rows) == 8  # (LoRA, BOFT: whose first layer would build a CUDA extension here) x 2 x 2
    skipped = [r for r in rows if r["status"] == "skipped"]
    # asked in the probe child, which found no GPU: a reason from the device, not from this process
    assert len(skipped) == 6 and all("cannot run on cuda" in r["error"]["message"] for r in skipped)
    ran = [r for r in rows if r["status"] != "skipped"]
    for r in ran:  # a cell process with no GPU; the run went on and reported it
        assert r["status"] == "error"
        assert r["unavailable"]["device_matmul_flops"].startswith(
            "the matmul rate could not be measured: lorabench-calibrate failed: "
        )
