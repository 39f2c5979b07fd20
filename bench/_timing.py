"""Interleaved wall-clock timing shared by the CPU benchmarks.

    times = time_interleaved({"dense": lambda: f(x), "moe": lambda: g(x)}, repeats=20)
    medians_ms(times)        # {"dense": 12.3, "moe": 8.1}

Each round calls every function once (in a rotating order with ``rotate=True``), so a slow
phase of a shared machine (other processes, clock changes) hits every candidate alike and the
ratio of medians is meaningful even when the absolute times drift. Imported as ``_timing`` by
scripts run as ``python bench/NAME.py`` (their folder is on ``sys.path``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["time_interleaved", "medians_ms", "median_ratios"]


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                     rotate: bool = False,
                     on_round: Callable[[int, dict[str, list[float]]], None] | None = None,
                     ) -> dict[str, list[float]]:
    """name -> seconds of each timed call (``repeats`` per name), measured interleaved.

    ``fns``: zero-argument callables. ``warmup``: untimed rounds first. ``rotate``: round r
    starts at the r-th function (no function always runs first). ``on_round(r, times)``:
    called after each round (progress lines). Runs under ``torch.no_grad``. Raises
    ValueError for ``repeats < 1``, ``warmup < 0`` or no functions.
    """
    if repeats < 1 or warmup < 0 or not fns:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and functions to time, got "
                         f"repeats={repeats}, warmup={warmup}, {len(fns)} functions")
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for _ in range(warmup):
            for n in names:
                fns[n]()
        for r in range(repeats):
            shift = r % len(names) if rotate else 0
            for n in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
            if on_round is not None:
                on_round(r, times)
    return times


def medians_ms(times: Mapping[str, list[float]]) -> dict[str, float]:
    """name -> median milliseconds."""
    return {n: 1e3 * statistics.median(ts) for n, ts in times.items()}


def median_ratios(times: Mapping[str, list[float]], base: str) -> dict[str, float]:
    """name -> median over rounds of (its time / ``base``'s time in the same round)."""
    ref = times[base]
    return {n: statistics.median(t / b for t, b in zip(ts, ref)) for n, ts in times.items()}
