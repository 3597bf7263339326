"""Guidance decided in one place: the loop asks the guidance object which rows to run and how to combine them.

Modelled on diffusers' ``guiders`` (``ClassifierFreeGuidance``: a per-step decision, then a combine),
with stepdiff's rule: the unconditional rows are kept apart and never sliced off, so guidance that
was switched off can come back. Interval, cutoff and schedule callbacks steer ``scale`` between steps;
the loop reads it before every model call.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._quiet import quiet_transformers

with quiet_transformers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

__all__ = ["ClassifierFreeGuidance", "DistilledGuidance", "Guidance", "check_guidance_scale"]

# Far above any useful setting (SD is used at 1-20); higher scales only overflow into black images.
MAX_GUIDANCE_SCALE = 1000.0


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


class ClassifierFreeGuidance(Guidance):
    """CFG (Ho & Salimans 2022) with optional rescale (Lin et al. 2023); no unconditional rows at scale <= 1."""

    mode = "cfg"

    def __init__(self, scale: float, rescale: float = 0.0) -> None:
        self.scale = scale
        self.rescale = rescale

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0

    def batches(self) -> tuple[str, ...]:
        return ("uncond", "cond") if self.scale > 1.0 else ("cond",)

    def combine(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        cond = outputs["cond"]
        uncond = outputs.get("uncond")
        if uncond is None:
            return cond
        guided = uncond + self.scale * (cond - uncond)
        if self.rescale > 0.0:
            guided = rescale_noise_cfg(guided, cond, guidance_rescale=self.rescale)
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
