"""Presets and the ``--cache`` spec: what the CLI, batch rows and the studio turn into policies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .core import ComputePolicy, _check_int, check_policies
from .first_block import AdaptiveGuidanceCallback, FirstBlockCacheCallback
from .unet import DeepCacheCallback, TGateCallback

__all__ = ["CACHE_GRAMMAR", "FAST_CUTOFF_RATIO", "describe", "fast_preset", "parse_cache_spec"]


CACHE_GRAMMAR = (
    "deepcache:INTERVAL[:BRANCH], tgate:GATE_STEP, fbc:THRESHOLD or adaptive:THRESHOLD, comma-separated "
    "(e.g. deepcache:3,tgate:10)"
)
FAST_CUTOFF_RATIO = 0.3  # the --fast preset's CFG cutoff, as a share of the steps


def fast_preset(num_inference_steps: int) -> list[Any]:
    """The ``--fast`` preset for a run of ``num_inference_steps`` steps: classifier-free guidance off after 30% of
    the steps (``CFGCutoffCallback``) and DeepCache (interval 3, branch 0). Of the combinations measured in
    benchmarks/bench_fast.py (docs/faster.md; figures on docs/measured.md) on the shipped model, the one with the most
    saved compute that keeps adherence on the 216 held-out pairs within a point of the default run (it measured 100.0%)."""
    from ..callbacks.cutoffs import CFGCutoffCallback  # not the package: stepdiff.callbacks re-exports caching

    _check_int("num_inference_steps", num_inference_steps, 1)
    # A ratio, not an index: the cutoff counts the run's model steps (2 * steps - 1 with Heun or KDPM2).
    return [CFGCutoffCallback(cutoff_step_ratio=FAST_CUTOFF_RATIO), DeepCacheCallback(3, 0)]


def describe(policies: list[Any]) -> str:
    """One line a person can read: what a preset or a spec turned into."""
    return " + ".join(repr(p) for p in policies)


def parse_cache_spec(spec: str, name: str = "--cache") -> list[ComputePolicy]:
    """``"deepcache:3,tgate:10"`` -> the policies; ValueError naming ``name``, the bad part and the grammar, or
    the rule it breaks (a policy given twice, two policies caching the same blocks: see ``check_policies``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{name} must be {CACHE_GRAMMAR}; got {spec!r}")
    makers: dict[str, tuple[Callable[..., ComputePolicy], tuple[Callable[[str], Any], ...]]] = {
        "deepcache": (DeepCacheCallback, (int, int)),
        "tgate": (TGateCallback, (int,)),
        "fbc": (FirstBlockCacheCallback, (float,)),
        "adaptive": (AdaptiveGuidanceCallback, (float,)),
    }
    policies = []
    for item in spec.split(","):
        key, *values = [part.strip() for part in item.strip().split(":")]
        maker = makers.get(key.lower())
        if maker is None or not 1 <= len(values) <= len(maker[1]):
            raise ValueError(f"{name}: {item.strip()!r} is not a policy; allowed: {CACHE_GRAMMAR}")
        try:
            args = [kind(v) for kind, v in zip(maker[1], values)]
        except ValueError:
            kinds = ", ".join("an int" if kind is int else "a number" for kind in maker[1][: len(values)])
            raise ValueError(f"{name}: {item.strip()!r}: {key} takes {kinds} after ':'; allowed: {CACHE_GRAMMAR}") from None
        try:
            policies.append(maker[0](*args))
        except ValueError as e:
            raise ValueError(f"{name}: {item.strip()!r}: {e}") from None
    check_policies(policies, name)
    return policies
