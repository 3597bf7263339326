"""Pipelines on the shared loop; each loads on first use (the list lives in ``registry``)."""

from __future__ import annotations

import importlib
from typing import Any

from .registry import REGISTRY

_LAZY = {
    **{e.name: e.module for e in REGISTRY},
    "AutoPipelineForText2Image": ".auto",
    "AutoPipelineForImage2Image": ".auto",
    "AutoPipelineForInpainting": ".auto",
    "StepDiffPipeline": ".base",
    "Run": ".run",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'stepdiff.pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
