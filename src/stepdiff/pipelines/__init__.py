"""Pipelines on the shared loop; families load on first use."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "AutoPipelineForText2Image": ".auto",
    "StableDiffusionPipeline": ".stable_diffusion",
    "StableDiffusionXLPipeline": ".stable_diffusion_xl",
    "StableDiffusion3Pipeline": ".stable_diffusion_3",
    "StepDiffPipeline": ".base",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'stepdiff.pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
