"""Energy over a cell's timed epochs, from the device's cumulative counter (NVML, amdsmi).

    lorabench check --device cuda        # measures how often the counter moves, per device name

The counters move in steps (NVML's on A100/H100 about every 100 ms), so an interval's energy is
off by up to one step: an interval shorter than MIN_PERIODS steps gets no figure, with why. The
counter is the device's, not the process's: other processes' work is in it too.
"""

from __future__ import annotations

import time
from typing import Any

from .trackers import Unavailable, unavailable

# An interval shorter than this many of the counter's update periods is mostly rounding: the
# counter moves in steps, so its difference is off by up to one period's energy (10 % here).
MIN_PERIODS = 10
# NVML's counter on A100 and H100 moves about every 100 ms (published measurements of NVML's
# energy and power readings, SC'24); used where `lorabench check` has not measured this device.
ASSUMED_UPDATE_S = 0.1


class EnergyMeter:
    """Energy over marked intervals (the timed epochs), from a cumulative counter in joules.

    `read` returns the counter in J or raises; the first failure makes the figure unavailable.
    An interval shorter than MIN_PERIODS of the counter's update period (`update_s`, measured by
    `lorabench check` or assumed: `update_from` says which) makes it unavailable too, with why."""

    def __init__(self, read, source: str, update_s: float = ASSUMED_UPDATE_S, update_from: str = "assumed"):
        self.read, self.source = read, source
        self.update_s, self.update_from = update_s, update_from
        self.joules, self.intervals, self._start = 0.0, 0, None
        self.shortest_s = float("inf")
        self.error: str | None = None

    def begin(self) -> None:
        try:
            self._start, self._t0 = self.read(), time.perf_counter()
        except Exception as e:
            self.error = self.error or f"{type(e).__name__}: {e}"

    def end(self) -> None:
        if self._start is None:
            return
        try:
            self.joules += self.read() - self._start
            self.intervals += 1
            self.shortest_s = min(self.shortest_s, time.perf_counter() - self._t0)
        except Exception as e:
            self.error = self.error or f"{type(e).__name__}: {e}"
        self._start = None

    def result(self) -> dict[str, Any]:
        if self.error or not self.intervals:
            why = self.error or "no timed epoch"
            return {"energy_j_per_epoch": unavailable(f"{self.source}: {why}")}
        if self.shortest_s < MIN_PERIODS * self.update_s:
            return {
                "energy_j_per_epoch": unavailable(
                    f"{self.source}: a timed epoch of {self.shortest_s * 1e3:,.0f} ms is shorter than "
                    f"{MIN_PERIODS} of the counter's update periods ({self.update_s * 1e3:,.0f} ms, "
                    f"{self.update_from}): the counter moves in steps"
                )
            }
        if self.joules <= 0:
            return {"energy_j_per_epoch": unavailable(f"{self.source}: the counter did not advance")}
        # the counters are the device's, not the process's: another process's work is in them too
        return {
            "energy_j_per_epoch": self.joules / self.intervals,
            "energy_source": f"{self.source} (the whole device: other processes' work included)",
        }


def update_period(read, seconds: float = 1.0, poll_s: float = 0.0005) -> float | Unavailable:
    """Seconds between the steps of a cumulative counter: `read` polled every `poll_s` for
    `seconds`, the median gap between the times its value changed (the device should be busy, so
    that every update moves it)."""
    changes, last = [], read()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        value = read()
        if value != last:
            changes.append(time.perf_counter())
            last = value
        time.sleep(poll_s)
    gaps = sorted(b - a for a, b in zip(changes, changes[1:]))
    if len(gaps) < 2:
        return unavailable(f"the counter moved {len(changes)} times in {seconds:g} s")
    return gaps[len(gaps) // 2]


def nvml_energy(nvml, handle, **update) -> EnergyMeter:
    # nvmlDeviceGetTotalEnergyConsumption: millijoules since the driver loaded (Volta and newer)
    return EnergyMeter(
        lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3, "NVML total energy counter", **update
    )


def amdsmi_energy(amdsmi, handle, **update) -> EnergyMeter:
    def read() -> float:
        e = amdsmi.amdsmi_get_energy_count(handle)
        counter = e.get("energy_accumulator", e.get("power"))  # the key was renamed across amdsmi versions
        return float(counter) * float(e["counter_resolution"]) / 1e6  # resolution is in microjoules

    return EnergyMeter(read, "amdsmi energy counter", **update)


def unavailable_energy(reason: str) -> EnergyMeter:
    """A meter that reads nothing and says why."""
    meter = EnergyMeter(lambda: 0.0, "energy")
    meter.begin = meter.end = lambda: None
    meter.result = lambda: {"energy_j_per_epoch": unavailable(reason)}
    return meter


def update_of(device_name: str) -> dict[str, Any]:
    """The energy counter's update period for `device_name`: measured by `lorabench check`, else assumed."""
    from . import calibration

    measured = calibration.energy_update_s(device_name)
    if measured:
        return {"update_s": measured, "update_from": f"measured by lorabench check on {device_name}"}
    return {
        "update_s": ASSUMED_UPDATE_S,
        "update_from": "assumed as published for A100/H100; `lorabench check` measures it",
    }
