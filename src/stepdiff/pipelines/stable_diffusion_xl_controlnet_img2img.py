"""Stable Diffusion XL image-to-image with ControlNets, on the shared loop."""

from __future__ import annotations

from typing import ClassVar

from ._sdxl_kinds import SDXLControlNetImageMixin, SDXLImageMixin
from .kinds import Image2ImageRun
from .signatures import classic_call
from .stable_diffusion_xl_controlnet import StableDiffusionXLControlNetPipeline

__all__ = ["StableDiffusionXLControlNetImg2ImgPipeline"]


class StableDiffusionXLControlNetImg2ImgPipeline(SDXLControlNetImageMixin, Image2ImageRun, StableDiffusionXLControlNetPipeline):
    """SDXL: re-draw ``image`` at ``strength`` following ``control_image``; arguments follow the classic pipeline.

    The classic pipeline names its control tensor ``control_image``, so the classic
    ``SDXLControlnetCFGCutoffCallback`` (which asks for ``image``) fails its input check there; here both names
    reach the control images and the official callback works.
    """

    _callback_tensor_inputs: ClassVar[list[str]] = [
        *SDXLImageMixin._callback_tensor_inputs, "control_image", "image",
    ]

    __call__ = classic_call("StableDiffusionXLControlNetImg2ImgPipeline")
