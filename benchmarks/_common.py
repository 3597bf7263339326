"""Helpers shared by the benchmarks: interleaved timing, medians, a markdown table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call.

    The contenders alternate so machine drift hits them alike, and the order rotates every round so
    that no contender always runs first (or always right after the same other one).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
