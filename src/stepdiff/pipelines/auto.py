"""Pick the pipeline class from a folder's model_index.json."""

from __future__ import annotations

import importlib
import os
from typing import Any

from .base import StepDiffPipeline

__all__ = ["AutoPipelineForText2Image", "pipeline_class_for"]

# model_index.json "_class_name" -> (module, stepdiff class); a family's module loads only when used.
_FAMILIES: dict[str, tuple[str, str]] = {
    "StableDiffusionPipeline": (".stable_diffusion", "StableDiffusionPipeline"),
    "StableDiffusionXLPipeline": (".stable_diffusion_xl", "StableDiffusionXLPipeline"),
    "StableDiffusion3Pipeline": (".stable_diffusion_3", "StableDiffusion3Pipeline"),
}


def pipeline_class_for(class_name: str | None) -> type[StepDiffPipeline] | None:
    if class_name not in _FAMILIES:
        return None
    module, name = _FAMILIES[class_name]
    return getattr(importlib.import_module(module, __package__), name)


class AutoPipelineForText2Image:
    """``AutoPipelineForText2Image.from_pretrained(folder)`` returns the right stepdiff pipeline."""

    def __init__(self) -> None:
        raise TypeError("use AutoPipelineForText2Image.from_pretrained(folder)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> StepDiffPipeline:
        class_name = StepDiffPipeline._check_folder(pretrained_model_name_or_path)
        family = pipeline_class_for(class_name)
        if family is None:
            supported = list(_FAMILIES)
            raise ValueError(
                f"{str(pretrained_model_name_or_path)!r} holds a {class_name!r} model; stepdiff supports {supported}"
            )
        return family.from_pretrained(pretrained_model_name_or_path, **kwargs)
