"""Stable Diffusion 1.x/2.x image-to-image on the shared loop."""

from __future__ import annotations

from .kinds import Image2ImageKind
from .signatures import classic_call
from .stable_diffusion import StableDiffusionPipeline

__all__ = ["StableDiffusionImg2ImgPipeline"]


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """Re-draw ``image`` at ``strength`` (0: keep it, 1: ignore it); arguments follow the classic pipeline."""

    kind = Image2ImageKind()

    __call__ = classic_call("StableDiffusionImg2ImgPipeline")
