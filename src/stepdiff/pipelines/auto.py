"""Pick the pipeline class from a folder's model_index.json and the kind of run asked for."""

from __future__ import annotations

import os
from typing import Any

from .base import StepDiffPipeline, check_folder
from .registry import REGISTRY, entry_for_class_name, load, pipeline_for

__all__ = ["AutoPipelineForImage2Image", "AutoPipelineForInpainting", "AutoPipelineForText2Image", "pipeline_class_for"]


def pipeline_class_for(class_name: str | None, kind: str = "text2image") -> type[StepDiffPipeline] | None:
    """The stepdiff class that runs ``kind`` for a folder whose model_index.json names ``class_name``."""
    entry = entry_for_class_name(class_name)
    if entry is None:
        return None
    target = pipeline_for(entry.family, kind)
    return None if target is None else load(target)


class _AutoPipeline:
    kind = "text2image"

    def __init__(self) -> None:
        raise TypeError(f"use {type(self).__name__}.from_pretrained(folder)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> StepDiffPipeline:
        class_name = check_folder(pretrained_model_name_or_path)
        entry = entry_for_class_name(class_name)
        if entry is None:
            supported = sorted({e.name for e in REGISTRY})
            raise ValueError(
                f"{str(pretrained_model_name_or_path)!r} holds a {class_name!r} model; stepdiff supports {supported}"
            )
        target = pipeline_for(entry.family, cls.kind, controlnet=kwargs.get("controlnet") is not None)
        if target is None:
            kinds = sorted({e.kind for e in REGISTRY if e.family == entry.family})
            what = f"{cls.kind} pipeline with a ControlNet" if kwargs.get("controlnet") is not None else f"{cls.kind} pipeline"
            raise ValueError(f"{class_name!r} models have no {what} in stepdiff; available: {kinds}")
        return load(target).from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: StepDiffPipeline, **kwargs: Any) -> StepDiffPipeline:
        """The same components (no copy, no reload) in this kind's pipeline class."""
        entry = entry_for_class_name(type(pipeline).__name__)
        controlnet = kwargs.get("controlnet", getattr(pipeline, "controlnet", None)) is not None
        target = None if entry is None else pipeline_for(entry.family, cls.kind, controlnet=controlnet)
        if target is None:
            what = f"{cls.kind} with a ControlNet" if controlnet else cls.kind
            raise ValueError(f"{type(pipeline).__name__} has no {what} counterpart in stepdiff")
        if "controlnet" in kwargs and kwargs["controlnet"] is None:  # drop the ControlNet, as diffusers does
            kwargs = {k: v for k, v in kwargs.items() if k != "controlnet"}
        return load(target).from_pipe(pipeline, **kwargs)


class AutoPipelineForText2Image(_AutoPipeline):
    """``AutoPipelineForText2Image.from_pretrained(folder)`` returns the right stepdiff pipeline."""

    kind = "text2image"


class AutoPipelineForImage2Image(_AutoPipeline):
    """``AutoPipelineForImage2Image.from_pretrained(folder)``: the family's image-to-image pipeline."""

    kind = "image2image"


class AutoPipelineForInpainting(_AutoPipeline):
    """``AutoPipelineForInpainting.from_pretrained(folder)``: the family's inpainting pipeline."""

    kind = "inpaint"
