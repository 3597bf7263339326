"""Compute policies: step caching and adaptive guidance, used from the callback list.

```py
pipe(prompt, callback_on_step_end=[SDXLCFGCutoffCallback(cutoff_step_ratio=0.4),
                                   DeepCacheCallback(cache_interval=3, cache_branch_id=0)])
```

A policy is a callback object. At run start it attaches per-run state to the run (``run.compute``); the
state decides, inside each model call, which of the denoiser's blocks run and which return what they
returned on an earlier step. The decision is made through the blocks' own ``forward``: while a run uses a
policy, the blocks it needs are wrapped (reference-counted, restored when the last such run ends), and
the wrapper asks a context variable which run's model call is executing, so a run in another thread, or
a call with no policy, runs the plain block. The denoiser's own ``forward`` is never copied.

Caches are kept per conditioning side (``cond`` / ``uncond``) with one row per image, so a CFG cutoff,
an interval or a schedule that changes the rows between steps reuses the right rows, and every image of
a batch gets exactly what it would get alone (decisions that depend on the pictures are made per row).
"""

from .core import ComputePolicy, RunCompute, check_policies
from .first_block import AdaptiveGuidanceCallback, FirstBlockCacheCallback
from .presets import CACHE_GRAMMAR, FAST_CUTOFF_RATIO, describe, fast_preset, parse_cache_spec
from .unet import DeepCacheCallback, TGateCallback

__all__ = [
    "CACHE_GRAMMAR",
    "FAST_CUTOFF_RATIO",
    "AdaptiveGuidanceCallback",
    "ComputePolicy",
    "DeepCacheCallback",
    "FirstBlockCacheCallback",
    "RunCompute",
    "TGateCallback",
    "check_policies",
    "describe",
    "fast_preset",
    "parse_cache_spec",
]
