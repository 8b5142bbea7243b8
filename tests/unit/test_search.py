"""The planner's search (`lorabench plan`): its candidates, what fits, the choice, the front, and
what a candidate trains differently; the command line's refusals."""

from __future__ import annotations

import shlex

import pytest

from lorabench.parser import build_parser
from lorabench.plan.cells import Cell, CellError
from lorabench.plan.search import Candidate, Search, candidates, changes, micro_batches
from lorabench.render import plans

MiB = 2**20


def test_micro_batches_are_the_powers_of_two_that_divide_the_batch_and_the_batch():
    assert micro_batches(16) == (1, 2, 4, 8, 16)
    assert micro_batches(12) == (1, 2, 4, 12)
    assert micro_batches(1) == (1,)


def test_candidates_keep_the_effective_batch_and_cross_the_free_axes():
    base = Cell("bert-tiny", "lora", 8, batch_size=8, samples=32)
    cells = candidates([base], {"grad_checkpointing": ("off", "on"), "precision": ("fp32", "bf16-mixed")})
    assert len(cells) == 4 * 2 * 2
    assert {c.batch_size * c.grad_accum for c in cells} == {8}
    assert {(c.batch_size, c.grad_accum) for c in cells} == {(1, 8), (2, 4), (4, 2), (8, 1)}
    assert {c.dtype for c in cells if c.precision == "bf16-mixed"} == {
        "float32"
    }  # fp32 weights, bf16 products
    with pytest.raises(CellError, match="does not divide the effective batch 8"):
        candidates([base], {}, micro=(3,))


def test_a_candidate_that_changes_what_is_trained_says_what():
    asked = Cell("bert-tiny", "full", samples=32)
    assert changes(asked, asked) == ()
    other = Cell("bert-tiny", "lora", 8, precision="bf16-mixed", optimizer="adamw", samples=32)
    assert changes(other, asked) == ("lora r=8", "precision bf16-mixed", "optimizer adamw")
    accumulated = Cell("bert-tiny", "full", batch_size=4, grad_accum=4, grad_checkpointing="on", samples=32)
    assert changes(accumulated, asked) == ()  # how a step runs, not what it computes


def _search(*points, budget=100 * MiB, margin=0.1) -> Search:
    cell = lambda m: Cell("bert-tiny", "full", batch_size=m, grad_accum=16 // m, samples=32)
    found = [Candidate(cell(m), need, step, why) for m, need, step, why in points]
    return Search("bert-tiny", found, budget, "--fit-memory", margin)


def test_the_choice_is_the_fastest_within_the_budget_less_its_margin_and_the_front_is_pareto():
    s = _search(
        (1, 30 * MiB, 1.6, None),  # 10 samples/s
        (2, 50 * MiB, 0.8, None),  # 20
        (4, 89 * MiB, 0.5, None),  # 32: within 90 MiB
        (8, 91 * MiB, 0.4, None),  # 40: over the margin, under the budget
        (16, 60 * MiB, 0.2, "the device cannot run it"),  # fastest, but cannot run
    )
    assert [c.cell.batch_size for c in s.fitting] == [1, 2, 4]
    assert s.choice.cell.batch_size == 4
    assert [c.cell.batch_size for c in s.front()] == [1, 2, 4, 8]
    assert s.smallest.cell.batch_size == 1
    assert _search((1, 95 * MiB, 1.0, None)).choice is None


def test_the_command_of_a_candidate_runs_that_candidate():
    cell = Cell("medium-llama", "lora", 16, batch_size=4, grad_accum=4, seq_len=256, grad_checkpointing="on")
    argv = shlex.split(plans.command(cell))
    args = build_parser().parse_args(argv[1:])
    assert (args.models, args.methods, args.ranks) == (["medium-llama"], ["lora"], [16])
    assert (args.batch_size, args.grad_accum, args.seq_len) == ((4,), 4, (256,))
    assert (args.grad_checkpointing, args.precision, args.optimizer) == (("on",), ("fp32",), ("adam",))


def test_bad_plan_input_is_one_line_and_exit_2(cli):
    code, _, err = cli("plan", "--models", "bert-tiny", "--fit-memory", "1GiB", "--micro-batches", "3")
    assert (
        code == 2 and "does not divide the effective batch 16" in err and len(err.strip().splitlines()) == 1
    )
    code, _, err = cli("plan", "--models", "bert-tiny", "--fit-memory", "1GiB", "--precision", "fp64")
    assert code == 2 and "fp64" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("plan", "--models", "bert-tiny", "--fit-memory", "1GiB", "--margin", "1.5")
    assert code == 2 and "--margin" in err


def test_quality_figures_of_a_run_are_matched_to_what_a_candidate_trains(tmp_path):
    from lorabench.commands import _quality
    from lorabench.results.rows import Row, Status
    from lorabench.results.rundir import RunDir

    run = RunDir.create(tmp_path)
    for seed, accuracy in ((0, 0.80), (1, 0.90)):
        run.append(
            Row.make(Cell("bert-tiny", "lora", 8, seed=seed), Status.OK, {"final_eval_accuracy": accuracy})
        )
    run.append(Row.make(Cell("bert-tiny", "full"), Status.OK, {"final_eval_accuracy": 0.95}))
    found = _quality(run.path)
    # a micro-batch with accumulation trains what its effective batch trains: the same figure
    candidate = Cell("bert-tiny", "lora", 8, batch_size=4, grad_accum=4, samples=32)
    assert found[plans.trained_key(candidate)] == pytest.approx(0.85)
    assert found[plans.trained_key(Cell("bert-tiny", "full"))] == 0.95
    assert plans.trained_key(Cell("bert-tiny", "lora", 8, precision="bf16-mixed")) not in found
