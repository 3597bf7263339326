"""Scheduler lookup by name: diffusers class names and short aliases (as the CLI's --scheduler takes them)."""

from __future__ import annotations

import inspect
from typing import Any

import diffusers

__all__ = ["SCHEDULER_ALIASES", "display_name", "karras_schedulers", "make_scheduler", "scheduler_class", "scheduler_names",
           "supports_karras"]

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


def scheduler_class(name: str) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, extra config) for an alias or a class name."""
    if name in SCHEDULER_ALIASES:
        class_name, extra, _ = SCHEDULER_ALIASES[name]
        return class_name, extra
    if name in _CLASS_NAMES:
        return name, {}
    raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(scheduler_names())}")


def supports_karras(name: str) -> bool:
    """Whether the scheduler ``name`` (alias or class name) has Karras sigmas (``use_karras_sigmas``)."""
    class_name, _ = scheduler_class(name)
    return "use_karras_sigmas" in inspect.signature(getattr(diffusers, class_name).__init__).parameters


def karras_schedulers() -> list[str]:
    """The aliases whose scheduler takes ``use_karras_sigmas``."""
    return [alias for alias in SCHEDULER_ALIASES if supports_karras(alias)]


def make_scheduler(name: str, config: Any, karras: bool = False):
    """A scheduler from ``name`` (alias or class name) and an existing scheduler's config.

    ``karras=True`` for a scheduler without Karras sigmas raises: diffusers would ignore it silently.
    """
    class_name, extra = scheduler_class(name)
    if karras and not supports_karras(name):
        raise ValueError(f"scheduler {name!r} has no Karras sigmas; use one of: {', '.join(karras_schedulers())}")
    if karras:
        extra = {**extra, "use_karras_sigmas": True}
    return getattr(diffusers, class_name).from_config(config, **extra)


def display_name(scheduler) -> str:
    """The A1111-style sampler name; " Karras" only when the scheduler really uses Karras sigmas."""
    karras = bool(scheduler.config.get("use_karras_sigmas", False))
    class_name = type(scheduler).__name__
    algorithm = getattr(scheduler.config, "algorithm_type", None)
    for alias_class, extra, label in SCHEDULER_ALIASES.values():
        if alias_class == class_name and extra.get("algorithm_type", algorithm) == algorithm:
            return label + (" Karras" if karras else "")
    return class_name
