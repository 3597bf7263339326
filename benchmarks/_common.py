"""Helpers shared by the benchmarks: interleaved timing, medians, a markdown table."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

# The tiny SD3 of the SD3 speed benchmarks (bench_guidance.py, bench_model_calls.py): big enough that the
# transformer dominates a step. Arguments of stepdiff.testing.make_tiny_sd3.
TINY_SD3 = {"layers": 4, "head_dim": 32, "sample_size": 32}
TINY_SD3_SMOKE = {"layers": 1, "head_dim": 8, "sample_size": 8}  # --smoke: the smallest that runs
def smoke_config(config: dict) -> dict:
    """--smoke: a real UNet config's layout (its blocks, attention, conditioning) at 32 channels a block, one layer
    a block and one attention layer each: the same code runs, in a fraction of a second."""
    blocks = len(config["block_out_channels"])
    narrow = {"block_out_channels": (32,) * blocks, "layers_per_block": 1, "attention_head_dim": 1, "norm_num_groups": 8}
    if "transformer_layers_per_block" in config:
        narrow["transformer_layers_per_block"] = 1
    return {**config, **narrow}


SMOKE = "smallest settings, a few seconds: checks that the script runs (tests/test_benchmarks.py); measures nothing"


def time_rounds(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call, one sample per contender per round.

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
    return samples


def medians(rounds: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds per contender."""
    return {name: statistics.median(s) for name, s in rounds.items()}


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call (see ``time_rounds``)."""
    return medians(time_rounds(fns, repeats, warmup))


def paired_ratio(rounds: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's time / b's time in the same round.

    On a machine whose speed drifts (this one's drifts by up to 20% within minutes), pairing the two
    runs of one round cancels the drift that a ratio of two medians keeps.
    """
    return statistics.median(x / y for x, y in zip(rounds[a], rounds[b]))


def ratio_interval(
    rounds: dict[str, list[float]], a: str, b: str, level: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """Bootstrap interval of ``paired_ratio``: rounds resampled with replacement (fixed seed).

    Two pipelines making identical model calls differ by less than this machine's noise; the
    interval says how far apart a run's ratio could be from 1.00 by chance alone.
    """
    ratios = [x / y for x, y in zip(rounds[a], rounds[b])]
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1.0 - level) / 2
    return meds[int(tail * resamples)], meds[min(resamples - 1, int((1.0 - tail) * resamples))]


def describe_paired(rounds: dict[str, list[float]], a: str, b: str) -> str:
    """The median per-round ratio with its 95% bootstrap interval, for a table cell."""
    low, high = ratio_interval(rounds, a, b)
    return f"{paired_ratio(rounds, a, b):.3f} (95% interval {low:.3f}-{high:.3f}, {len(rounds[a])} rounds)"


class ModelClock:
    """Splits a pipeline call's time into the model's forward calls and everything else.

    The rest (prompt encoding, scheduler, guidance, callbacks, decoding) is what the pipeline code
    itself decides, so comparing it between two pipelines isolates their own overhead.
    """

    def __init__(self, module) -> None:
        self.inside = 0.0
        self.outside: list[float] = []
        self._started = 0.0
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _before(self, mod, args) -> None:
        self._started = time.perf_counter()

    def _after(self, mod, args, output) -> None:
        self.inside += time.perf_counter() - self._started

    def wrap(self, call: Callable[[], object]) -> Callable[[], None]:
        """``call``, recording the seconds it spends outside the model."""
        def run() -> None:
            self.inside = 0.0
            start = time.perf_counter()
            call()
            self.outside.append(time.perf_counter() - start - self.inside)
        return run

    def median_outside(self) -> float:
        return statistics.median(self.outside)


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
