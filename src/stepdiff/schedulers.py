"""Scheduler lookup by name: diffusers class names and short aliases (as the CLI's --scheduler takes them)."""

from __future__ import annotations

from typing import Any

import diffusers

__all__ = ["SCHEDULER_ALIASES", "make_scheduler", "scheduler_names"]

# alias -> (diffusers class name, extra config, display name in A1111-style metadata)
SCHEDULER_ALIASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "DPM++ 2M SDE"),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {}, "DPM++ 2S"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "deis": ("DEISMultistepScheduler", {}, "DEIS"),
    "kdpm2": ("KDPM2DiscreteScheduler", {}, "DPM2"),
    "kdpm2-a": ("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a"),
}
_CLASS_NAMES = sorted({cls for cls, _, _ in SCHEDULER_ALIASES.values()})


def scheduler_names() -> list[str]:
    return [*SCHEDULER_ALIASES, *_CLASS_NAMES]


def make_scheduler(name: str, config: Any, karras: bool = False):
    """A scheduler from ``name`` (alias or class name) and an existing scheduler's config."""
    if name in SCHEDULER_ALIASES:
        class_name, extra, _ = SCHEDULER_ALIASES[name]
    elif name in _CLASS_NAMES:
        class_name, extra = name, {}
    else:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(scheduler_names())}")
    if karras:
        extra = {**extra, "use_karras_sigmas": True}
    return getattr(diffusers, class_name).from_config(config, **extra)


def display_name(scheduler, karras: bool) -> str:
    class_name = type(scheduler).__name__
    algorithm = getattr(scheduler.config, "algorithm_type", None)
    for alias_class, extra, label in SCHEDULER_ALIASES.values():
        if alias_class == class_name and extra.get("algorithm_type", algorithm) == algorithm:
            return label + (" Karras" if karras else "")
    return class_name
