"""A year of nightlies: judged and drawn in seconds."""

import time
from pathlib import Path

import pytest

from lorabench.results import history
from lorabench.results.rundir import RunDir

pytestmark = pytest.mark.slow
REFERENCE = Path(__file__).resolve().parents[2] / "results" / "20261123-211355-558bee"


def test_a_year_of_nightlies_renders_in_seconds(tmp_path):
    """365 nights x 30 cells, judged and drawn (the pictures too): the note quotes the time."""
    base = history.night_of(REFERENCE, RunDir.load([REFERENCE])[0])
    cells = {
        f"{k}-{i}": {**c, "label": f"{c['label']} #{i}"} for i in range(5) for k, c in base.cells.items()
    }
    nights = [
        history.Night(
            f"2026{d:04d}-031700-000000",
            f"2026-01-01T{d:05d}",
            f"{d:040x}",
            base.accelerator,
            base.environment,
            cells,
        )
        for d in range(365)
    ]
    t0 = time.perf_counter()
    series = history.series_of(nights)
    from lorabench.render.trends import history_page

    page = history_page(series, tmp_path / "p", "p/")
    seconds = time.perf_counter() - t0
    print(f"365 nights x {len(cells)} cells: judged and rendered in {seconds:.1f} s")
    assert len(cells) == 30 and page.count("![") == 30 and seconds < 60
