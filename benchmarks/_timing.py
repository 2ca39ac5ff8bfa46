"""Shared timing helper for the benchmark scripts: warm-up, then the median of repeats."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of fn() in seconds (sync() runs before each clock read, for GPUs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                collect: bool = False) -> dict[str, list[float]]:
    """Wall times of several functions run in turn, round after round, so that a noisy
    machine slows all of them alike; ratios are taken within a round. With ``collect``,
    a full garbage collection before each call (untimed), so that no call pays for the
    garbage of the one before it."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if collect:
                gc.collect()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, ready to paste into the README."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
