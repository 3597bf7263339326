"""Stable Diffusion XL image-to-image on the shared loop, refiner models included (``denoising_start``)."""

from __future__ import annotations

from ._sdxl_kinds import SDXLImageMixin
from .kinds import Image2ImageRun
from .signatures import classic_call
from .stable_diffusion_xl import StableDiffusionXLPipeline

__all__ = ["StableDiffusionXLImg2ImgPipeline"]


class StableDiffusionXLImg2ImgPipeline(SDXLImageMixin, Image2ImageRun, StableDiffusionXLPipeline):
    """Re-draw ``image`` at ``strength``, or continue a base run's latents from ``denoising_start`` (refiner)."""

    __call__ = classic_call("StableDiffusionXLImg2ImgPipeline")
