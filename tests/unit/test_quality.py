"""Quality over seeds and time, by hand: the t interval, time to a target, the front."""

import math

import pytest

from lorabench.measure.stats import Interval, t975
from lorabench.plan.cells import Cell
from lorabench.render.quality import front
from lorabench.results import quality
from lorabench.results.rows import Row, Status


def accuracy_target(value: float) -> quality.Target:
    """An accuracy target, as --target-accuracy sets one."""
    return quality.Goal(accuracy=value).target(None)


def row(
    seed: int, accuracy: float, curve: list[tuple[int, float, float]], method: str = "lora", **metrics
) -> Row:
    cell = Cell(model="cifar-mlp", method=method, rank=8 if method != "full" else None, seed=seed)
    # a loss that falls as the accuracy rises: 1 - accuracy
    points = [{"step": s, "train_s": t, "eval_loss": 1 - a, "eval_accuracy": a} for s, t, a in curve]
    return Row.make(cell, Status.OK, {"final_eval_accuracy": accuracy, **metrics}, curve=points)


def test_the_interval_is_students_t_over_the_seeds():
    i = Interval.of([0.80, 0.84, 0.88])
    half = 4.303 * 0.04 / math.sqrt(3)  # t(0.975, 2) x s / sqrt(n); s = 0.04
    assert i.mean == pytest.approx(0.84) and (i.lo, i.hi) == (
        pytest.approx(0.84 - half),
        pytest.approx(0.84 + half),
    )
    assert i.n == 3 and i.spread and not Interval.of([0.5]).spread
    assert Interval.of([0.5]).lo == Interval.of([0.5]).hi == 0.5
    assert t975(1) == 12.706 and t975(11) == 2.228 and t975(100) == 1.96  # between rows: the wider one
    assert Interval.of([1, 2, 3]).overlaps(Interval.of([2.5, 3, 3.5])) and not Interval.of([1, 1.1]).overlaps(
        Interval.of([5, 5.1])
    )


def test_time_to_target_is_the_first_point_at_or_above_it_training_time_only():
    r = row(0, 0.9, [(4, 0.5, 0.60), (8, 1.0, 0.79), (12, 1.5, 0.80), (16, 2.0, 0.95)])
    assert quality.reached(r, accuracy_target(0.80)) == (1.5, 12)
    assert quality.reached(r, accuracy_target(0.96)) is None
    assert quality.best(r) == 0.95


def test_a_loss_target_is_reached_at_or_below_it_and_its_best_is_the_least_loss():
    r = row(0, 0.9, [(4, 0.5, 0.60), (8, 1.0, 0.79), (12, 1.5, 0.80), (16, 2.0, 0.95)])  # losses 0.4 .. 0.05
    loss = quality.Goal(loss=0.2).target(None)
    assert loss.key == "eval_loss" and loss.said == "eval loss 0.2, as given"
    assert quality.reached(r, loss) == (1.5, 12)  # 0.20 is at most 0.2; 0.21 before it is not
    ttt = quality.time_to_target([r], quality.Goal(loss=0.01).target(None))
    assert ttt.seconds is None and ttt.best == pytest.approx(0.05) and ttt.reached == 0


def test_a_target_the_user_sets_wins_over_full_fine_tunings_share():
    full = [row(0, 0.9, [(4, 1.0, 1.0)], method="full")]
    given = quality.Goal(accuracy=0.5).target(full)
    assert (given.key, given.value, given.said) == ("eval_accuracy", 0.5, "eval accuracy 0.5, as given")
    derived = quality.Goal().target(full)
    assert derived.value == pytest.approx(0.95) and derived.said.startswith("95% of full fine-tuning's best")
    assert quality.Goal().target(None) is None  # nothing to derive it from


def test_over_seeds_the_time_to_target_says_how_many_reached_it_and_trims_from_five():
    three = [
        row(0, 0.9, [(4, 1.0, 0.9)]),
        row(1, 0.9, [(4, 2.0, 0.9)]),
        row(2, 0.5, [(4, 1.0, 0.5)]),  # never gets there
    ]
    ttt = quality.time_to_target(three, accuracy_target(0.8))
    assert (ttt.reached, ttt.seeds, ttt.seconds.mean) == (2, 3, 1.5)
    assert ttt.how == "mean of the 2 of 3 seeds that reached it"
    five = [row(s, 0.9, [(4, t, 0.9)]) for s, t in enumerate([1.0, 2.0, 3.0, 4.0, 100.0])]
    ttt = quality.time_to_target(five, accuracy_target(0.8))
    assert ttt.seconds.mean == pytest.approx(3.0) and "dropping the fastest and the slowest" in ttt.how


def test_the_target_is_a_share_of_full_fine_tunings_best_and_quality_is_relative_to_its_mean():
    full = [row(s, 0.9, [(4, 1.0, b)], method="full") for s, b in enumerate([0.90, 1.00])]
    assert quality.Goal().target(full).value == pytest.approx(0.95 * 0.95)
    lora = [row(0, 0.45, []), row(1, 0.9, [])]
    rel = quality.relative(lora, full)  # full's mean final accuracy is 0.9
    assert rel.mean == pytest.approx(0.75) and rel.n == 2


def test_a_seed_counts_once_however_many_times_it_was_repeated():
    rows = [row(0, 0.5, []), row(0, 0.7, []), row(1, 0.9, [])]
    assert [r.cell.seed for r in quality.per_seed(rows)] == [0, 1]
    assert quality.over_seeds(rows, "final_eval_accuracy").mean == pytest.approx(0.7)  # 0.5 and 0.9


def test_the_front_keeps_what_nothing_beats_on_both_cost_and_quality():
    pts = [(100, 0.9), (50, 0.8), (60, 0.7), (300, 0.95), (50, 0.6)]
    assert front(pts) == [(50, 0.8), (100, 0.9), (300, 0.95)]
