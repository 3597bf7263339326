"""The metadata every stepdiff image carries, whoever made it (``generate``, ``serve``, ``batch``).

Two parts, written by :func:`stepdiff.images.save_image`: the popular web UIs' ``parameters`` text and a
``stepdiff`` JSON record with the full settings and the run record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ImageSettings", "image_metadata", "write_image"]


@dataclass
class ImageSettings:
    """What a user asked for, for one image (``seed`` is this image's own seed)."""

    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    model: str
    negative_prompt: str | None = None
    cfg_cutoff_ratio: float | None = None
    cfg_cutoff_step: int | None = None
    strength: float | None = None
    init_image: str | None = None
    mask: str | None = None
    cache: str | None = None  # the step caching policies, as stepdiff.caching.describe writes them
    keep_unmasked: bool | None = None  # inpainting: whether the init image's pixels were pasted back outside the mask
    keep_unmasked_feather: float | None = None  # ... and the feather (pixels) of that paste


def image_metadata(settings: ImageSettings, image, scheduler, output, extra: dict[str, Any] | None = None):
    """``(parameters, record)`` for ``image``, one of the images of pipeline ``output`` made with ``scheduler``.

    ``extra`` adds fields to the JSON record (for example a job id or a batch row key).
    """
    from . import __version__
    from .schedulers import display_name

    s = settings
    cutoff = s.cfg_cutoff_ratio if s.cfg_cutoff_ratio is not None else s.cfg_cutoff_step
    fields = {
        "Steps": s.steps, "Sampler": display_name(scheduler), "CFG scale": s.guidance_scale,
        "Seed": s.seed, "Size": f"{image.width}x{image.height}", "Model": Path(s.model).name,
        "CFG cutoff": cutoff, "Interrupted at step": output.steps_completed if output.interrupted else None,
        "Stop reason": output.stop_reason if output.interrupted else None,
        "Stop output": _stop_output(output) if output.interrupted else None,
        "Denoising strength": s.strength,
        "Cache": None if s.cache is None else json.dumps(s.cache),  # quoted: the policies' own commas stay inside
        "Keep unmasked": None if s.keep_unmasked is None else (
            f"feather {s.keep_unmasked_feather:g}" if s.keep_unmasked else "no"),
        "Version": f"stepdiff {__version__}",
    }
    lines = [s.prompt]
    if s.negative_prompt:
        lines.append(f"Negative prompt: {s.negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    record = {
        "prompt": s.prompt, "negative_prompt": s.negative_prompt, "seed": s.seed, "steps": s.steps,
        "scheduler": type(scheduler).__name__, "karras": bool(scheduler.config.get("use_karras_sigmas", False)),
        "guidance_scale": s.guidance_scale, "cfg_cutoff_ratio": s.cfg_cutoff_ratio,
        "cfg_cutoff_step": s.cfg_cutoff_step, "model": s.model, "stepdiff_version": __version__,
        "record": output.record.to_dict(), "interrupted": output.interrupted,
        "steps_completed": output.steps_completed, "stop_reason": output.stop_reason,
        "init_image": s.init_image, "mask": s.mask, "strength": s.strength, "cache": s.cache,
        "keep_unmasked": s.keep_unmasked, "keep_unmasked_feather": s.keep_unmasked_feather,
    }
    if extra:
        record.update(extra)
    return "\n".join(lines), record


def _stop_output(output) -> str | None:
    """What an interrupted run's picture is: "finish (3 steps)", "denoised" or "latents"."""
    record = getattr(output, "record", None)
    what = getattr(record, "stop_output", None)
    if what == "finish":
        return f"finish ({record.finish_steps} step{'s' if record.finish_steps != 1 else ''})"
    return what


def write_image(path, settings: ImageSettings, image, scheduler, output, extra: dict[str, Any] | None = None) -> Path:
    """Write ``image`` atomically to ``path`` with the metadata of :func:`image_metadata`."""
    from .images import save_image

    parameters, record = image_metadata(settings, image, scheduler, output, extra)
    return save_image(image, path, parameters, record)
