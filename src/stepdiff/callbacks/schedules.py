"""Per-step schedules: the guidance scale (an interval, a list, a function), the ControlNet conditioning scale and
the IP-Adapter scale, each set before the step's model call."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..guidance import step_of
from .base import _cfg_scale, _per_run, _set_cfg_scale

__all__ = [
    "ControlNetScaleScheduleCallback", "GuidanceIntervalCallback", "GuidanceScheduleCallback",
    "IPAdapterScaleScheduleCallback", "ScheduleFn", "cosine_ramp", "linear_ramp",
]


ScheduleFn = Callable[[int, int, torch.Tensor], float]


def _scale(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


class _ScheduledGuidance:
    """Sets the guidance scale of every step before its model call (step 0 at run start).

    A scale <= 1 means no guidance: the loop computes only the conditional rows on that step. Where
    guidance comes back on, the original negative conditioning is used.
    """

    tensor_inputs: list[str] = []  # noqa: RUF012

    def scale_at(self, pipeline: Any, step_index: int) -> float:
        raise NotImplementedError

    def get_scale(self, pipeline: Any) -> float:
        return pipeline.guidance_scale

    def set_scale(self, pipeline: Any, value: float) -> None:
        pipeline.guidance_scale = value

    def on_run_start(self, pipeline: Any) -> None:
        _per_run(pipeline, self)["base"] = self.get_scale(pipeline)  # the call's own scale
        self.set_scale(pipeline, self.scale_at(pipeline, 0))

    def __call__(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> None:
        if step_index + 1 < pipeline.num_timesteps:
            self.set_scale(pipeline, self.scale_at(pipeline, step_index + 1))
        return None


class GuidanceIntervalCallback(_ScheduledGuidance):
    """Classifier-free guidance only on steps in [start, end); no unconditional pass elsewhere.

    Guidance interval: Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves
    sample and distribution quality". Give ratios of the step count (``start_ratio``, ``end_ratio``)
    or step indices (``start_step``, ``end_step``). Inside the interval the scale is ``scale``, or the
    call's ``guidance_scale`` when ``scale`` is None. On Flux the interval is true CFG's (``true_cfg_scale``).
    """

    get_scale = staticmethod(_cfg_scale)
    set_scale = staticmethod(_set_cfg_scale)

    def __init__(
        self, start_ratio: float | None = None, end_ratio: float | None = None, *,
        start_step: int | None = None, end_step: int | None = None, scale: float | None = None,
    ) -> None:
        if start_ratio is not None and start_step is not None:
            raise ValueError("give start_ratio or start_step, not both")
        if end_ratio is not None and end_step is not None:
            raise ValueError("give end_ratio or end_step, not both")
        self.start_ratio = None if start_ratio is None else _check_unit("start_ratio", start_ratio)
        self.end_ratio = None if end_ratio is None else _check_unit("end_ratio", end_ratio)
        self.start_step = None if start_step is None else _check_step("start_step", start_step)
        self.end_step = None if end_step is None else _check_step("end_step", end_step)
        if self.start_ratio is not None and self.end_ratio is not None and self.start_ratio > self.end_ratio:
            raise ValueError(f"start_ratio ({self.start_ratio}) must not be after end_ratio ({self.end_ratio})")
        if self.start_step is not None and self.end_step is not None and self.start_step > self.end_step:
            raise ValueError(f"start_step ({self.start_step}) must not be after end_step ({self.end_step})")
        self.scale = None if scale is None else _scale("scale", scale)

    def bounds(self, num_steps: int) -> tuple[int, int]:
        start = self.start_step if self.start_step is not None else step_of(num_steps, self.start_ratio or 0.0)
        end = self.end_step if self.end_step is not None else (
            num_steps if self.end_ratio is None else step_of(num_steps, self.end_ratio)
        )
        return start, end

    def on_run_start(self, pipeline: Any) -> None:
        start, end = self.bounds(pipeline.num_timesteps)
        if start > end:
            raise ValueError(f"guidance interval starts at step {start}, after its end at step {end}")
        super().on_run_start(pipeline)

    def scale_at(self, pipeline: Any, step_index: int) -> float:
        start, end = self.bounds(pipeline.num_timesteps)
        base = _per_run(pipeline, self)["base"]
        return (self.scale if self.scale is not None else base) if start <= step_index < end else 0.0


class GuidanceScheduleCallback(_ScheduledGuidance):
    """A guidance scale per step: a list with one scale per step, or ``fn(step_index, num_steps, timestep)``.

    It sets the pipeline's ``guidance_scale``: classifier-free guidance on SD, SDXL and SD3, the distilled guidance
    embedding on Flux (guidance-distilled transformers; true CFG there is ``GuidanceIntervalCallback``'s and the
    cutoffs')."""

    def __init__(self, schedule: Sequence[float] | ScheduleFn) -> None:
        if callable(schedule):
            self.schedule: Sequence[float] | ScheduleFn = schedule
        elif isinstance(schedule, (list, tuple)):
            self.schedule = [_scale(f"schedule[{i}]", v) for i, v in enumerate(schedule)]
        else:
            raise ValueError(f"schedule must be a list of scales or a function, got {type(schedule).__name__}")

    def on_run_start(self, pipeline: Any) -> None:
        if not callable(self.schedule) and len(self.schedule) != pipeline.num_timesteps:
            raise ValueError(
                f"schedule has {len(self.schedule)} scales but this run has {pipeline.num_timesteps} steps; "
                "give one scale per step"
            )
        super().on_run_start(pipeline)

    def scale_at(self, pipeline: Any, step_index: int) -> float:
        if not callable(self.schedule):
            return self.schedule[step_index]
        value = self.schedule(step_index, pipeline.num_timesteps, pipeline.timesteps[step_index])
        return _scale(f"schedule function at step {step_index}", value)


class _ScaleSchedule:
    """A scale per step, set on the current run before each step's model call (step 0 at run start): a list with
    one entry per step, or ``fn(step_index, num_steps, timestep)`` (``linear_ramp`` and ``cosine_ramp`` fit).
    An entry is a number, or a list (one scale per ControlNet, or diffusers' per-adapter IP-Adapter scales)."""

    tensor_inputs: list[str] = []  # noqa: RUF012

    def __init__(self, schedule: Sequence[float | Sequence[float]] | ScheduleFn) -> None:
        if callable(schedule):
            self.schedule: Any = schedule
        elif isinstance(schedule, (list, tuple)):
            self.schedule = [self._entry(f"schedule[{i}]", v) for i, v in enumerate(schedule)]
        else:
            raise ValueError(f"schedule must be a list of scales or a function, got {type(schedule).__name__}")

    @staticmethod
    def _entry(name: str, value: object) -> float | list[float]:
        if isinstance(value, (list, tuple)):
            return [_scale(f"{name}[{k}]", v) for k, v in enumerate(value)]
        return _scale(name, value)

    def scale_at(self, pipeline: Any, step_index: int) -> float | list[float]:
        if not callable(self.schedule):
            return self.schedule[step_index]
        value = self.schedule(step_index, pipeline.num_timesteps, pipeline.timesteps[step_index])
        return self._entry(f"schedule function at step {step_index}", value)

    def check(self, pipeline: Any) -> None:
        raise NotImplementedError

    def apply(self, pipeline: Any, value: float | list[float]) -> None:
        raise NotImplementedError

    def on_run_start(self, pipeline: Any) -> None:
        self.check(pipeline)
        if not callable(self.schedule) and len(self.schedule) != pipeline.num_timesteps:
            raise ValueError(
                f"schedule has {len(self.schedule)} scales but this run has {pipeline.num_timesteps} steps; "
                "give one scale per step"
            )
        self.apply(pipeline, self.scale_at(pipeline, 0))

    def __call__(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> None:
        if step_index + 1 < pipeline.num_timesteps:
            self.apply(pipeline, self.scale_at(pipeline, step_index + 1))
        return None


class ControlNetScaleScheduleCallback(_ScaleSchedule):
    """A ControlNet conditioning scale per step, like ``GuidanceScheduleCallback`` for guidance. An entry is a
    number (every ControlNet) or a list with one scale per ControlNet. It *is* the scale (it multiplies nothing),
    set on the current run only (the next call starts from its own ``controlnet_conditioning_scale``), and a
    ControlNet still acts only inside its ``control_guidance_start`` / ``control_guidance_end`` window.
    """

    def check(self, pipeline: Any) -> None:
        if not hasattr(type(pipeline), "controlnet_conditioning_scale"):
            raise ValueError(f"ControlNetScaleScheduleCallback needs a ControlNet pipeline, got {type(pipeline).__name__}")

    def apply(self, pipeline: Any, value: float | list[float]) -> None:
        pipeline.controlnet_conditioning_scale = value


class IPAdapterScaleScheduleCallback(_ScaleSchedule):
    """An IP-Adapter scale per step (what ``set_ip_adapter_scale`` takes: a number, or one per loaded adapter),
    set on the current run only: the next call starts from the scale its caller set."""

    def check(self, pipeline: Any) -> None:
        run = getattr(pipeline, "current_run", None)
        if run is None or run.extras.ip_adapter_scales is None:
            raise ValueError(
                "IPAdapterScaleScheduleCallback needs a stepdiff run with an IP-Adapter image (load_ip_adapter, then "
                "pass ip_adapter_image or ip_adapter_image_embeds)"
            )

    def apply(self, pipeline: Any, value: float | list[float]) -> None:
        pipeline.set_ip_adapter_scale(value)


def linear_ramp(start_scale: float, end_scale: float) -> ScheduleFn:
    """A schedule going linearly from ``start_scale`` at the first step to ``end_scale`` at the last."""
    a, b = _scale("start_scale", start_scale), _scale("end_scale", end_scale)
    return lambda i, n, t: a + (b - a) * (i / max(n - 1, 1))


def cosine_ramp(start_scale: float, end_scale: float) -> ScheduleFn:
    """A half-cosine schedule from ``start_scale`` to ``end_scale`` (flat at both ends)."""
    a, b = _scale("start_scale", start_scale), _scale("end_scale", end_scale)
    return lambda i, n, t: a + (b - a) * (1 - math.cos(math.pi * i / max(n - 1, 1))) / 2


def _check_unit(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_step(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)
