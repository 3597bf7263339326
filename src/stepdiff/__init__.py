"""stepdiff: text-to-image diffusion whose denoising loop can be steered at every step.

The top level is lazy (PEP 562): ``import stepdiff`` is cheap, and each name imports its module on
first use, so the CLI starts quickly and ``stepdiff --help`` is instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .pipelines import registry as _registry

__version__ = "0.1.0"

# Scheduler classes re-exported from diffusers, so the classic import lines work unchanged.
_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
)
_LAZY = {
    **{e.name: ".pipelines" + e.module for e in _registry.REGISTRY},
    "AutoPipelineForText2Image": ".pipelines.auto",
    "AutoPipelineForImage2Image": ".pipelines.auto",
    "AutoPipelineForInpainting": ".pipelines.auto",
    "StepDiffPipeline": ".pipelines.base",
    "Run": ".pipelines.run",
    "StepDiffPipelineOutput": ".output",
    "RunRecord": ".output",
    "CancelToken": ".control",
    "default_model": ".models",
    "default_controlnet": ".models",
    **{name: ".caching" for name in (
        "AdaptiveGuidanceCallback", "DeepCacheCallback", "FirstBlockCacheCallback", "TGateCallback",
    )},
}
_SUBMODULES = ("caching", "callbacks", "preview", "pipelines", "schedulers", "testing", "loop", "shapes", "guidance", "vae")

__all__ = [*_SCHEDULERS, *_LAZY, "__version__", "callbacks", "preview"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SCHEDULERS:
        from ._quiet import quiet_transformers

        with quiet_transformers():
            value = getattr(importlib.import_module("diffusers"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'stepdiff' has no attribute {name!r}")
    globals()[name] = value  # cache: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DEISMultistepScheduler,
        DPMSolverMultistepScheduler,
        DPMSolverSinglestepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        HeunDiscreteScheduler,
        KDPM2AncestralDiscreteScheduler,
        KDPM2DiscreteScheduler,
        LMSDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

    from . import callbacks, preview
    from .caching import AdaptiveGuidanceCallback, DeepCacheCallback, FirstBlockCacheCallback, TGateCallback
    from .control import CancelToken
    from .models import default_model
    from .output import RunRecord, StepDiffPipelineOutput
    from .pipelines.auto import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
    from .pipelines.base import StepDiffPipeline
    from .pipelines.run import Run
    from .pipelines.stable_diffusion import StableDiffusionPipeline
    from .pipelines.stable_diffusion_3 import StableDiffusion3Pipeline
    from .pipelines.stable_diffusion_xl import StableDiffusionXLPipeline
