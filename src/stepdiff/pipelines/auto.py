"""Pick the pipeline class from a folder's model_index.json."""

from __future__ import annotations

import os
from typing import Any

from .base import StepDiffPipeline
from .stable_diffusion import StableDiffusionPipeline
from .stable_diffusion_3 import StableDiffusion3Pipeline
from .stable_diffusion_xl import StableDiffusionXLPipeline

__all__ = ["AutoPipelineForText2Image", "pipeline_class_for"]

_FAMILIES: tuple[type[StepDiffPipeline], ...] = (
    StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline,
)


def pipeline_class_for(class_name: str | None) -> type[StepDiffPipeline] | None:
    for family in _FAMILIES:
        if class_name in family._family_class_names:
            return family
    return None


class AutoPipelineForText2Image:
    """``AutoPipelineForText2Image.from_pretrained(folder)`` returns the right stepdiff pipeline."""

    def __init__(self) -> None:
        raise TypeError("use AutoPipelineForText2Image.from_pretrained(folder)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> StepDiffPipeline:
        class_name = StepDiffPipeline._check_folder(pretrained_model_name_or_path)
        family = pipeline_class_for(class_name)
        if family is None:
            supported = [name for f in _FAMILIES for name in f._family_class_names]
            raise ValueError(
                f"{str(pretrained_model_name_or_path)!r} holds a {class_name!r} model; stepdiff supports {supported}"
            )
        return family.from_pretrained(pretrained_model_name_or_path, **kwargs)
