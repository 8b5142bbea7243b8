"""`lorabench plan` as a user runs it: the choice within the budget, its command, the front, a
budget nothing fits refused with what the smallest needs, and --verify holding the prediction
against a real run. In the slow tier: every candidate is surveyed and --verify trains."""

import shlex

import pytest

from lorabench.parser import build_parser

pytestmark = pytest.mark.slow

PLAN = ("plan", "--models", "bert-tiny", "--batch-size", "8", "--precision", "fp32", "--optimizer", "adam")


def test_the_plan_chooses_within_the_budget_and_verify_proves_it(cli, in_tmp):
    code, out, err = cli(*PLAN, "--grad-checkpointing", "off", "--fit-memory", "60MiB", "--verify")
    assert code == 0, err
    assert "bert-tiny: 12 candidates" in out and "Pareto front" in out
    choice = next(line for line in out.splitlines() if line.startswith("Choice: "))
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("lorabench run "))
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.models == ["bert-tiny"] and f"micro {args.batch_size[0]} x {args.grad_accum}" in choice
    assert args.batch_size[0] * args.grad_accum == 8
    verified = [line for line in out.splitlines() if line.startswith("| ") and "micro" in line]
    row = [c.strip() for c in verified[-1].split("|")]
    assert row[4] == "yes"  # measured peak within the budget
    assert 0.5 < float(row[7]) < 2.0  # predicted / measured throughput
    assert (in_tmp / "results").is_dir() and list((in_tmp / "report").glob("*.md"))


def test_a_budget_below_every_candidate_says_what_the_smallest_needs(cli):
    code, out, err = cli(
        *PLAN, "--grad-checkpointing", "on", "--methods", "lora", "--ranks", "8", "--fit-memory", "1MiB"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (
        "no candidate of bert-tiny fits 1 MiB less the 10% margin" in err
        and "the smallest, lora r=8, micro 1 x 8" in err
    )
