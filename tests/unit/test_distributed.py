"""Cells of several processes, without starting any: FSDP2's units, predictions per rank, folding
the ranks' figures into a row, naming the rank that ended a cell, the scaling table. The processes
themselves run in tests/system/test_distributed_runs.py."""

import pytest
import torch

from lorabench.plan.cells import Cell
from lorabench.plan.survey import survey
from lorabench.results import fold as folds
from lorabench.results.fold import ProcessResult
from lorabench.results.measured import Measured
from lorabench.results.metrics import METRICS
from lorabench.results.rows import Row, Status
from lorabench.workload import distributed, methods, models


def adapted(model, method, rank=None):
    with torch.device("meta"):
        bundle = models.build(model, "random", None)
        return methods.METHODS[method].apply(bundle, Cell(model=model, method=method, rank=rank).adapter)


def test_fsdp2_units_are_the_transformer_blocks_or_else_each_linear_with_its_adapters():
    bert = adapted("bert-tiny", "lora", 8).module
    assert [type(u).__name__ for u in distributed.units(bert)] == ["BertLayer", "BertLayer"]
    largest, root = distributed.unit_params(bert)
    # BERT-Tiny, hidden 128: a block is 4 x 128^2 attention + 2 x 128 x 512 MLP + biases and norms,
    # plus the r=8 adapters on query and value: 2 x 8 x (128 + 128)
    assert largest == 4 * (128 * 128 + 128) + 128 * 512 + 512 + 512 * 128 + 128 + 2 * 2 * 128 + 2 * 8 * 256
    assert largest * 2 + root == sum(p.numel() for p in bert.parameters())
    mlp = adapted("cifar-mlp", "lora", 8).module
    units = distributed.units(mlp)
    assert len(units) == 3 and all(
        hasattr(u, "base_layer") for u in units
    )  # frozen base and adapters: one unit
    assert distributed.unit_params(mlp)[1] == 0  # the root holds nothing of its own


@pytest.mark.parametrize("model, method, rank", [("cifar-mlp", "full", None), ("bert-tiny", "lora", 8)])
def test_predictions_per_rank_shard_the_state_under_fsdp2_and_add_buckets_under_ddp(model, method, rank):
    one = survey(Cell(model=model, method=method, rank=rank)).prediction
    ddp = survey(Cell(model=model, method=method, rank=rank, nproc=2, strategy="ddp")).prediction
    fsdp = survey(Cell(model=model, method=method, rank=rank, nproc=4, strategy="fsdp2")).prediction
    assert (ddp.weights_bytes, ddp.grads_bytes, ddp.optimizer_bytes) == (
        one.weights_bytes,
        one.grads_bytes,
        one.optimizer_bytes,
    )
    assert ddp.comm_bytes == one.grads_bytes  # the reducer's buckets: every trainable gradient once more
    assert fsdp.weights_bytes == -(-one.weights_bytes // 4) and fsdp.optimizer_bytes == -(
        -one.optimizer_bytes // 4
    )
    largest, root = distributed.unit_params(adapted(model, method, rank).module)
    assert fsdp.comm_bytes == (root + 2 * largest) * 4
    assert fsdp.activations_bytes == one.activations_bytes  # each rank's micro-batch is the one-process batch
    assert fsdp.flops_per_step == 4 * one.flops_per_step and fsdp.tokens_per_step == 4 * one.tokens_per_step
    assert "predicted_comm_bytes" not in one.to_metrics() and ddp.to_metrics()["predicted_comm_bytes"] > 0


def result(index, status="ok", ended=None, facts=None, **figures):
    return ProcessResult(
        index,
        Measured(
            Status(status),
            figures,
            env_facts=facts or {},
            error=None if status == "ok" else {"type": "RuntimeError", "message": "x"},
        ),
        ended_at=ended,
    )


def test_fold_gives_the_max_over_ranks_their_sum_and_one_entry_per_rank():
    folded = folds.fold(
        [
            result(0, host_peak_rss_bytes=100, step_s_p50=0.2, weights_bytes=10, params_total=7),
            result(1, host_peak_rss_bytes=140, step_s_p50=0.3, weights_bytes=10, params_total=7),
        ]
    )
    m = folded.figures
    assert (m["host_peak_rss_bytes"], m["host_peak_rss_sum_bytes"], m["step_s_p50"]) == (140, 240, 0.3)
    assert m["params_total"] == 7 and "torch_peak_allocated_sum_bytes" not in m  # nothing to sum: not a zero
    assert [
        (e["process"], e["host_peak_rss_bytes"], e["torch_peak_allocated_bytes"]) for e in folded.per_process
    ] == [(0, 100, None), (1, 140, None)]


def test_a_sum_is_left_out_when_a_rank_did_not_report():
    folded = folds.fold([result(0, host_peak_rss_bytes=100), ProcessResult(1, exitcode=-9, ended_at=1.0)])
    assert "host_peak_rss_sum_bytes" not in folded.figures and folded.figures["host_peak_rss_bytes"] == 100
    kept = [m.key for m in METRICS if m.per_process]
    assert folded.per_process[1] == {
        "process": 1,
        "status": "crashed",
        "device": None,
        "cuda_bad_fork": None,
        **{k: None for k in kept},
    }


def test_energy_is_summed_over_the_devices_each_once_and_the_driver_views_kept_per_rank():
    gpu = lambda uuid: {"gpu_uuid": uuid, "cuda_bad_fork": False}
    two = folds.fold(
        [
            result(0, facts=gpu("a"), energy_j_per_epoch=100.0, nvml_device_used_peak_bytes=5),
            result(1, facts=gpu("b"), energy_j_per_epoch=150.0, nvml_device_used_peak_bytes=7),
        ]
    )
    assert two.figures["energy_j_per_epoch"] == 250.0  # two GPUs: not rank 0's 100 J alone
    assert two.figures["nvml_device_used_peak_bytes"] == 7  # per device: the fullest
    assert [
        (e["device"], e["energy_j_per_epoch"], e["nvml_device_used_peak_bytes"], e["cuda_bad_fork"])
        for e in two.per_process
    ] == [("a", 100.0, 5, False), ("b", 150.0, 7, False)]
    shared = folds.fold(
        [
            result(0, facts=gpu("a"), energy_j_per_epoch=100.0),
            result(1, facts=gpu("a"), energy_j_per_epoch=101.0),
        ]
    )
    assert shared.figures["energy_j_per_epoch"] == 101.0  # one device's counter, read twice: counted once


def test_devices_are_told_apart_by_pci_address_where_rocm_repeats_a_uuid():
    """HIP fills torch's UUID from the device's unique id; devices without one report the same
    (zeros): keyed by UUID, two GPUs' energy was counted as one device's."""
    zeros = "00000000-0000-0000-0000-000000000000"
    gpu = lambda pci: {"gpu_uuid": zeros, "gpu_pci_bus_id": pci, "cuda_bad_fork": False}
    two = folds.fold(
        [
            result(0, facts=gpu("00000000:C1:00"), energy_j_per_epoch=100.0),
            result(1, facts=gpu("00000000:C2:00"), energy_j_per_epoch=150.0),
        ]
    )
    assert two.figures["energy_j_per_epoch"] == 250.0
    assert [e["device"] for e in two.per_process] == ["00000000:C1:00", "00000000:C2:00"]


def test_energy_is_unavailable_unless_every_rank_read_its_device():
    from lorabench.measure.trackers import Unavailable

    missing = folds.fold(
        [
            result(0, energy_j_per_epoch=100.0),
            result(1, energy_j_per_epoch=Unavailable("NVML total energy counter: Not Supported")),
        ]
    )
    assert missing.figures["energy_j_per_epoch"] == Unavailable(
        "process 1 of 2: NVML total energy counter: Not Supported"
    )
    died = folds.fold([result(0, energy_j_per_epoch=100.0), ProcessResult(1, exitcode=-9, ended_at=1.0)])
    assert died.figures["energy_j_per_epoch"] == Unavailable("process 1 of 2: it ended without a result")


def test_the_rank_that_died_is_named_before_the_peers_that_raised_after_it():
    killed = ProcessResult(1, exitcode=-9, ended_at=10.3)
    raised = result(0, "error", ended=10.1)  # seen first: its error came out of the same wait
    assert folds.root_cause([raised, killed]) is killed
    assert killed.death() == "SIGKILL"
    late = ProcessResult(1, exitcode=-9, ended_at=12.0)  # more than a second later: not what ended the cell
    assert folds.root_cause([raised, late]) is raised
    assert folds.root_cause([result(0), result(1)]) is None


def test_the_scaling_table_divides_by_the_same_method_in_one_process():
    from lorabench.render.tables import fold_repeats, scaling_efficiency, scaling_table

    def row(nproc, sps, strategy=None):
        cell = Cell(model="cifar-mlp", method="full", nproc=nproc, strategy=strategy)
        return Row.make(
            cell,
            Status.OK,
            {
                "step_s_p50": cell.batch_size * nproc / sps,
                "host_peak_rss_bytes": 2**30,
                **({"host_peak_rss_sum_bytes": nproc * 2**30} if nproc > 1 else {}),
            },
        )

    variants = [
        fold_repeats([row(1, 100.0)]),
        fold_repeats([row(2, 150.0, "ddp")]),
        fold_repeats([row(2, 120.0, "fsdp2")]),
    ]
    assert variants[1].metrics["samples_per_s"] == pytest.approx(150.0)  # global: every rank's samples
    assert scaling_efficiency(variants, variants[1]) == pytest.approx(0.75)
    assert scaling_efficiency(variants, variants[2]) == pytest.approx(0.60)
    table = scaling_table(variants)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [(c[1], c[2], c[-1]) for c in cells] == [
        ("-", "1", ""),
        ("ddp", "2", "75%"),
        ("fsdp2", "2", "60%"),
    ]
    assert "2,048.0" in table  # all devices: the sum of the two ranks' peaks


def test_the_fit_gate_counts_every_rank_of_a_cpu_cell_against_the_one_host_memory():
    from lorabench.plan.admission import fit_gate

    one, two = Cell(model="cifar-mlp", method="full"), Cell(model="cifar-mlp", method="full", nproc=2)
    s1, s2 = survey(one), survey(two)
    free = s1.prediction.peak_bytes + 1  # room for one replica, not for two
    assert s2.prediction.peak_bytes == s1.prediction.peak_bytes + s1.prediction.grads_bytes  # DDP's buckets
    skipped = fit_gate([one, two], [s1, s2], free, "host memory available", force=False)
    assert list(skipped) == [two.key()] and "predicted to need" in skipped[two.key()]
