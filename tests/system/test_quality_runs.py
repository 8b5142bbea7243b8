"""What each method costs in quality, as a user meets it: `lorabench run` with no arguments adapts
trained bases, made once and then reused, and reports quality over time, time to target and
forgetting beside memory and time."""

import re

from conftest import rows_in, run_subprocess


def test_the_default_run_compares_quality_on_trained_bases_made_once(tmp_path):
    env_cache = tmp_path / "cache"
    out = run_subprocess(
        "run", "--progress", "off", cwd=tmp_path, timeout=900, env={"LORABENCH_CACHE": str(env_cache)}
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = rows_in(tmp_path)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    made = [r for r in rows if "made here" in r["info"]["base"]]
    assert sorted(r["cell"]["model"] for r in made) == ["bert-tiny", "cifar-mlp"]  # once per model
    assert sorted(p.suffix for p in (env_cache / "bases").iterdir()) == [
        ".json",
        ".json",
        ".lock",
        ".lock",
        ".safetensors",
        ".safetensors",
    ]
    for r in rows:
        m = r["metrics"]
        assert r["cell"]["weights"] == "trained" and len(r["curve"]) >= 12  # every 4 of 48 steps
        assert 0 <= m["source_accuracy_before"] <= 1 and m["forgetting_pt"] is not None and m["eval_s"] > 0
    assert max(len(line) for line in out.stdout.splitlines()) <= 120
    assert "of full fine-tuning's accuracy (one seed: no spread measured)" in " ".join(out.stdout.split())
    report = next((tmp_path / "report").glob("*.md")).read_text()
    for model in ("cifar-mlp", "bert-tiny"):
        section = report[report.index(f"## {model}") :]
        assert "### Quality" in section and "time to target (s)" in section and "forgetting (pt)" in section
        pictures = re.findall(rf"!\[{model}: [^\]]*\]\(([^)]+)\)", section)
        assert any(p.endswith("-quality-curves.png") for p in pictures)
        assert any(p.endswith("-pareto.png") for p in pictures)
    again = run_subprocess(
        "run", "--models", "cifar-mlp", "--methods", "lora", "--ranks", "8", "--samples", "64", "--epochs", "1",
        "--progress", "off", "--out", "again", cwd=tmp_path, env={"LORABENCH_CACHE": str(env_cache)},
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    (row,) = rows_in(tmp_path / "again")
    assert "cached" in row["info"]["base"] and "base_made_s" not in row["metrics"]


def test_on_the_zoos_tiny_transfers_every_method_states_its_share_of_full_or_that_it_fell_short(tmp_path):
    """The architectures people bring (a decoder's causal LM, an encoder's classifier), each adapting
    its trained base: every method's row in the report's quality table gives its share of full
    fine-tuning's accuracy and its time to the target (95 % of full's best), or says `not reached`."""
    methods = ["full", "lora", "ia3"]
    out = run_subprocess(
        "run", "--models", "tiny-llama,tiny-roberta", "--methods", ",".join(methods), "--ranks", "8",
        "--weights", "trained", "--samples", "128", "--eval-samples", "64", "--seq-len", "32",
        "--epochs", "1", "--warmup-epochs", "0", "--eval-every", "2", "--progress", "off", cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert {r["status"] for r in rows_in(tmp_path)} == {"ok"}
    report = next((tmp_path / "report").glob("*.md")).read_text()
    for model in ("tiny-llama", "tiny-roberta"):
        section = report[report.index(f"## {model}") :]
        table = section[section.index("### Quality") :].split("\n\n")[1].splitlines()[2:]
        cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table}
        assert sorted(m.split()[0] for m in cells) == sorted(methods), table
        for method, (seeds, accuracy, share, to_target, reached, *_) in cells.items():
            assert 0 <= float(share) <= 1000, (model, method)  # a share of full's accuracy, in % (IA3: 0.0)
            assert to_target == "not reached" if reached == "0/1" else float(to_target) > 0, (model, method)
        assert cells["full"][3] != "not reached"  # full fine-tuning reaches 95 % of its own best
