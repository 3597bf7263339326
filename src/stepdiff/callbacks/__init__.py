"""Official step callbacks: ``callback(pipeline, step_index, timestep, callback_kwargs) -> dict``.

Same class names and constructor contract as the classic library (``diffusers.callbacks``), with
its defects fixed: CFG cutoff works for every batch size (the loop keeps conditional and
unconditional rows apart, so nothing is sliced), and a callback may return ``None`` for "no change".

The package's modules: ``base`` (the protocol, ``PipelineCallback``, ``MultiPipelineCallbacks``), ``cutoffs`` (the
classic CFG and IP-Adapter cutoffs), ``stops`` (ending a run early) and ``schedules`` (a scale per step). The
compute policies (DeepCache, TGate, first-block cache, adaptive guidance) live in ``stepdiff.caching`` and are
re-exported here, where the classic library's users look for callbacks.
"""

from __future__ import annotations

from ..caching import AdaptiveGuidanceCallback, DeepCacheCallback, FirstBlockCacheCallback, TGateCallback
from .base import MultiPipelineCallbacks, PipelineCallback, StepCallback
from .cutoffs import (
    CFGCutoffCallback,
    FluxCFGCutoffCallback,
    IPAdapterScaleCutoffCallback,
    SD3CFGCutoffCallback,
    SDCFGCutoffCallback,
    SDXLCFGCutoffCallback,
    SDXLControlnetCFGCutoffCallback,
    adapt_classic,
)
from .schedules import (
    ControlNetScaleScheduleCallback,
    GuidanceIntervalCallback,
    GuidanceScheduleCallback,
    IPAdapterScaleScheduleCallback,
    ScheduleFn,
    cosine_ramp,
    linear_ramp,
)
from .stops import NaNGuard, StopAtStep, StopOnConvergence, Timeout

__all__ = [
    "AdaptiveGuidanceCallback",
    "CFGCutoffCallback",
    "ControlNetScaleScheduleCallback",
    "DeepCacheCallback",
    "FirstBlockCacheCallback",
    "FluxCFGCutoffCallback",
    "GuidanceIntervalCallback",
    "GuidanceScheduleCallback",
    "IPAdapterScaleCutoffCallback",
    "IPAdapterScaleScheduleCallback",
    "MultiPipelineCallbacks",
    "NaNGuard",
    "PipelineCallback",
    "SD3CFGCutoffCallback",
    "SDCFGCutoffCallback",
    "SDXLCFGCutoffCallback",
    "SDXLControlnetCFGCutoffCallback",
    "ScheduleFn",
    "StepCallback",
    "StopAtStep",
    "StopOnConvergence",
    "TGateCallback",
    "Timeout",
    "adapt_classic",
    "cosine_ramp",
    "linear_ramp",
]
