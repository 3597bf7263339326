"""Guidance decided in one place: the loop asks the guidance object which rows to run and how to combine them.

Modelled on diffusers' ``guiders`` (``ClassifierFreeGuidance``: a per-step decision, then a combine),
with stepdiff's rule: the unconditional rows are kept apart and never sliced off, so guidance that
was switched off can come back. Interval, cutoff and schedule callbacks steer ``scale`` between steps;
the loop reads it before every model call.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._quiet import quiet_transformers

with quiet_transformers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

__all__ = [
    "ClassifierFreeGuidance", "DistilledGuidance", "Guidance", "GuidanceWindow", "SkipLayerGuidance",
    "check_guidance_scale", "control_window", "skip_layer_window", "step_of",
]

# What a library call accepts: far above any useful setting (SD is used at 1-20); higher scales only overflow into
# black images. A request from the CLI, a batch row or the studio has a tighter limit, stepdiff.limits.MAX_GUIDANCE
# (100): a library call is refused only where it cannot work, a request where it cannot look right. (Kept here, not
# in limits.py, so that the engine imports nothing from the callers' side.)
MAX_GUIDANCE_SCALE = 1000.0


# ---------------------------------------------------------------- windows: which steps a setting acts on
# Every "is it on at step i" in stepdiff is one of the functions below, over the run's real number of model steps
# (``run.num_timesteps``: 2 * steps - 1 with Heun or KDPM2, whose every step but the last makes two model calls).
# The cutoff, the interval, the studio's plan and the gate use ``step_of``; skip-layer guidance and the ControlNet
# window keep the classic pipelines' own boundary rules (parity), written here beside it.


def step_of(num_steps: int, ratio: float) -> int:
    """The step a ratio of a run names: ``int(num_steps * ratio)``, as the classic cutoff callbacks and guiders."""
    return int(num_steps * ratio)


@dataclass(frozen=True)
class GuidanceWindow:
    """When classifier-free guidance is on, composed of a CFG cutoff, a guidance interval and a gate.

    ``cutoff``: guided up to and including step ``step_of(n, cutoff)`` (``CFGCutoffCallback``'s change lands
    after that step); ``interval``: guided on steps in ``[step_of(n, start), step_of(n, end))`` (guidance interval,
    Kynkäänniemi et al. 2024; ``GuidanceIntervalCallback``); ``gate``: unguided from this step on, whatever the
    others say (``TGateCallback``). An interval replaces a cutoff; with neither, every step before the gate is guided.
    """

    cutoff: float | None = None
    interval: tuple[float, float] | None = None
    gate: int | None = None

    def guided(self, step: int, num_steps: int) -> bool:
        if self.gate is not None and step >= self.gate:
            return False
        if self.interval is not None:
            start, end = (step_of(num_steps, r) for r in self.interval)
            return start <= step < end
        return self.cutoff is None or step <= step_of(num_steps, self.cutoff)

    def scale_at(self, scale: float, step: int, num_steps: int) -> float:
        """``scale`` inside the window, 0 (no unconditional rows) outside it."""
        return scale if self.guided(step, num_steps) else 0.0


def skip_layer_window(step: int, num_steps: int, start: float, stop: float) -> bool:
    """SD3's skip-layer guidance acts strictly inside ``(num_steps * start, num_steps * stop)``, as the classic
    pipeline."""
    return num_steps * start < step < num_steps * stop


def control_window(step: int, num_steps: int, start: float, end: float) -> bool:
    """A ControlNet acts on a step whose whole span ``[step, step + 1) / num_steps`` lies in ``[start, end]`` (the
    classic ``controlnet_keep``; float comparisons kept as they are there, for parity)."""
    return not (step / num_steps < start or (step + 1) / num_steps > end)


def check_guidance_scale(value: object, name: str = "guidance_scale") -> float:
    """A real, finite scale in [0, MAX_GUIDANCE_SCALE]; a clear error naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= MAX_GUIDANCE_SCALE:
        raise ValueError(f"{name} must be a finite number in [0, {MAX_GUIDANCE_SCALE:g}], got {value!r}")
    return value


class Guidance:
    """What the loop asks before and after every model call."""

    scale: float = 1.0
    mode: str = "none"

    def batches(self) -> tuple[str, ...]:
        """Which conditioning sides to run this step, in batch order: ("cond",) or ("uncond", "cond")."""
        raise NotImplementedError

    def combine(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One model output per image from the outputs of the sides that ran."""
        raise NotImplementedError

    def start(self, num_steps: int) -> None:
        """Called once the run knows its number of steps, before the first one."""

    def refine(
        self, step_index: int, guided: torch.Tensor, outputs: dict[str, torch.Tensor],
        extra_call: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        """A further correction that needs another model call (``extra_call(side, **model_kwargs)``); none here."""
        return guided


class ClassifierFreeGuidance(Guidance):
    """CFG (Ho & Salimans 2022) with optional rescale (Lin et al. 2023); no unconditional rows at scale <= 1."""

    mode = "cfg"

    def __init__(self, scale: float, rescale: float = 0.0) -> None:
        self.scale = scale
        self.rescale = rescale
        self.similar_threshold: float | None = None  # adaptive guidance (see end_when_similar)
        self.ended: torch.Tensor | None = None  # (B,) bool: images whose guidance has ended

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0

    def end_when_similar(self, threshold: float) -> None:
        """Adaptive guidance (Castillo et al. 2023): an image's guidance ends from the step after the cosine
        similarity of its conditional and unconditional predictions passes ``threshold``."""
        self.similar_threshold = threshold

    def batches(self) -> tuple[str, ...]:
        if self.ended is not None and bool(self.ended.all()):
            return ("cond",)
        return ("uncond", "cond") if self.scale > 1.0 else ("cond",)

    def combine(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        cond = outputs["cond"]
        uncond = outputs.get("uncond")
        if uncond is None:
            return cond
        guided = uncond + self.scale * (cond - uncond)
        if self.rescale > 0.0:
            guided = rescale_noise_cfg(guided, cond, guidance_rescale=self.rescale)
        if self.similar_threshold is not None:
            guided = self._adapt(guided, cond, uncond)
        return guided

    def _adapt(self, guided: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        ended = self.ended if self.ended is not None else torch.zeros(cond.shape[0], dtype=torch.bool, device=cond.device)
        if bool(ended.any()):  # images past their threshold take the conditional prediction, as when alone
            guided = torch.where(ended.view(-1, *[1] * (cond.ndim - 1)), cond, guided)
        similarity = torch.nn.functional.cosine_similarity(cond.flatten(1).float(), uncond.flatten(1).float(), dim=1)
        self.ended = ended | (similarity > self.similar_threshold)
        return guided


class DistilledGuidance(Guidance):
    """Guidance-distilled denoisers (LCM, UNets with ``time_cond_proj_dim``): the scale is an input embedding,
    so every step runs the conditional rows only and there is nothing to cut off."""

    mode = "distilled"

    def __init__(self, scale: float) -> None:
        self.scale = scale

    @property
    def enabled(self) -> bool:
        return False

    def batches(self) -> tuple[str, ...]:
        return ("cond",)

    def combine(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs["cond"]


class SkipLayerGuidance(ClassifierFreeGuidance):
    """CFG plus skip-layer guidance (SD3.5's "SLG", as in the classic SD3 pipeline): inside a window of
    the steps, the conditional rows run once more with ``layers`` of the transformer skipped, and the
    guided output moves away from that weakened prediction by ``layer_scale``. Only while CFG is on."""

    mode = "cfg+slg"

    def __init__(self, scale: float, layers: list[int], layer_scale: float, start: float, stop: float) -> None:
        super().__init__(scale)
        self.layers, self.layer_scale, self.start_ratio, self.stop_ratio = list(layers), layer_scale, start, stop
        self.num_steps = 0

    def start(self, num_steps: int) -> None:
        self.num_steps = num_steps

    def refine(self, step_index, guided, outputs, extra_call):
        if "uncond" not in outputs or not skip_layer_window(step_index, self.num_steps, self.start_ratio, self.stop_ratio):
            return guided
        skipped = extra_call("cond", skip_layers=self.layers)
        return guided + (outputs["cond"] - skipped) * self.layer_scale
