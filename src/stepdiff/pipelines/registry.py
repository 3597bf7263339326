"""One registry of pipelines: which family, which kind of run, which module.

Read by ``stepdiff`` and ``stepdiff.pipelines`` for their lazy imports, by ``auto`` to pick a class,
and by the loading errors for their hints. What a pipeline class takes, counted in source places:

- a kind or feature combination of an existing family: its class (a few lines: the family class with
  ``kind = ...`` / ``features = ...`` and its ``__call__`` signature) and one line here;
- a new family with its kinds: the family module (prompts -> conditioning, one model call, callback names;
  its kinds are ``Image2ImageKind`` / ``InpaintKind`` objects, with parameters where the family differs), one
  line here per class, and its ``__call__`` signatures. ``tests/test_toy_family.py`` shows it: no shared module
  names the toy family.

docs/architecture.md draws the house.
This module imports nothing from the pipelines, so there is no import cycle.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["KINDS", "REGISTRY", "PipelineEntry", "entry_for_class_name", "load", "pipeline_for"]

KINDS = ("text2image", "image2image", "inpaint")


@dataclass(frozen=True)
class PipelineEntry:
    name: str  # the class name, the same as the classic library's
    module: str  # relative to stepdiff.pipelines
    family: str  # "sd", "sdxl", "sd3", "flux": folders of one family load into any of its kinds
    kind: str  # one of KINDS
    controlnet: bool = False  # takes a ``controlnet`` component and control images


REGISTRY: tuple[PipelineEntry, ...] = (
    PipelineEntry("StableDiffusionPipeline", ".stable_diffusion", "sd", "text2image"),
    PipelineEntry("StableDiffusionImg2ImgPipeline", ".stable_diffusion_img2img", "sd", "image2image"),
    PipelineEntry("StableDiffusionInpaintPipeline", ".stable_diffusion_inpaint", "sd", "inpaint"),
    PipelineEntry("StableDiffusionControlNetPipeline", ".stable_diffusion_controlnet", "sd", "text2image", controlnet=True),
    PipelineEntry(
        "StableDiffusionControlNetImg2ImgPipeline", ".stable_diffusion_controlnet_img2img", "sd", "image2image",
        controlnet=True,
    ),
    PipelineEntry(
        "StableDiffusionControlNetInpaintPipeline", ".stable_diffusion_controlnet_inpaint", "sd", "inpaint",
        controlnet=True,
    ),
    PipelineEntry("StableDiffusionXLPipeline", ".stable_diffusion_xl", "sdxl", "text2image"),
    PipelineEntry("StableDiffusionXLImg2ImgPipeline", ".stable_diffusion_xl_img2img", "sdxl", "image2image"),
    PipelineEntry("StableDiffusionXLInpaintPipeline", ".stable_diffusion_xl_inpaint", "sdxl", "inpaint"),
    PipelineEntry(
        "StableDiffusionXLControlNetPipeline", ".stable_diffusion_xl_controlnet", "sdxl", "text2image", controlnet=True,
    ),
    PipelineEntry(
        "StableDiffusionXLControlNetImg2ImgPipeline", ".stable_diffusion_xl_controlnet_img2img", "sdxl", "image2image",
        controlnet=True,
    ),
    PipelineEntry(
        "StableDiffusionXLControlNetInpaintPipeline", ".stable_diffusion_xl_controlnet_inpaint", "sdxl", "inpaint",
        controlnet=True,
    ),
    PipelineEntry("StableDiffusion3Pipeline", ".stable_diffusion_3", "sd3", "text2image"),
    PipelineEntry("StableDiffusion3Img2ImgPipeline", ".stable_diffusion_3_img2img", "sd3", "image2image"),
    PipelineEntry("StableDiffusion3InpaintPipeline", ".stable_diffusion_3_inpaint", "sd3", "inpaint"),
    PipelineEntry("FluxPipeline", ".flux", "flux", "text2image"),
    PipelineEntry("FluxImg2ImgPipeline", ".flux_img2img", "flux", "image2image"),
    PipelineEntry("FluxInpaintPipeline", ".flux_inpaint", "flux", "inpaint"),
)

_BY_NAME = {e.name: e for e in REGISTRY}


def entry_for_class_name(class_name: str | None) -> PipelineEntry | None:
    """The entry of a model_index.json ``_class_name`` (any kind of its family is fine to load)."""
    return _BY_NAME.get(class_name)  # type: ignore[arg-type]


def pipeline_for(family: str, kind: str, controlnet: bool = False) -> PipelineEntry | None:
    for e in REGISTRY:
        if e.family == family and e.kind == kind and e.controlnet == controlnet:
            return e
    return None


def load(entry: PipelineEntry) -> type:
    return getattr(importlib.import_module(entry.module, "stepdiff.pipelines"), entry.name)
