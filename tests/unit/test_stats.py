import pytest

from lorabench.measure.stats import Summary


def test_hand_computed_values():
    s = Summary.of([4, 1, 3, 2])
    assert s.median == 2.5  # mean of the two middle values
    assert s.percentile(90) == pytest.approx(3.7)  # 3 + 0.7 * (4 - 3)
    assert s.mean == 2.5
    assert s.stdev == pytest.approx(1.2909944)  # sqrt(5/3)
    assert s.stdev_pct == pytest.approx(51.63978, rel=1e-5)
    assert Summary.of([7]).stdev == 0 and Summary.of([7]).p90 == 7


def test_empty_is_refused():
    with pytest.raises(ValueError):
        Summary.of([])
