"""Stable Diffusion XL image-to-image on the shared loop, refiner models included (``denoising_start``)."""

from __future__ import annotations

from typing import ClassVar

from ._sdxl_kinds import IMAGE_CALLBACK_NAMES, IMAGE_CALLBACK_TENSOR_INPUTS
from .components import classic_init
from .kinds import Image2ImageKind
from .signatures import classic_call
from .stable_diffusion_xl import StableDiffusionXLPipeline

__all__ = ["StableDiffusionXLImg2ImgPipeline"]


class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLPipeline):
    """Re-draw ``image`` at ``strength``, or continue a base run's latents from ``denoising_start`` (refiner)."""

    kind = Image2ImageKind(refiner=True)
    _callback_tensor_inputs: ClassVar[list[str]] = IMAGE_CALLBACK_TENSOR_INPUTS
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = IMAGE_CALLBACK_NAMES
    __init__ = classic_init("StableDiffusionXLImg2ImgPipeline")

    __call__ = classic_call("StableDiffusionXLImg2ImgPipeline")
