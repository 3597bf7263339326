"""Stable Diffusion XL inpainting with ControlNets, on the shared loop (9-channel inpainting UNets and ordinary ones)."""

from __future__ import annotations

from typing import ClassVar

from ._sdxl_kinds import (
    IMAGE_CALLBACK_NAMES,
    IMAGE_CALLBACK_TENSOR_INPUTS,
)
from .components import classic_init
from .controlnet import ControlNetFeature
from .ip_adapter import IPAdapterFeature
from .kinds import INPAINT_CALLBACK_NAMES, InpaintKind
from .signatures import classic_call
from .stable_diffusion_xl_controlnet import StableDiffusionXLControlNetPipeline

__all__ = ["StableDiffusionXLControlNetInpaintPipeline"]


class StableDiffusionXLControlNetInpaintPipeline(StableDiffusionXLControlNetPipeline):
    """SDXL: repaint the white part of ``mask_image`` following ``control_image``; arguments follow the classic
    pipeline.

    The ControlNets see the 4-channel latents, also with a 9-channel inpainting UNet. The control images are the
    callback tensor ``control_image`` (classic name) and also ``image``, so the official ControlNet callbacks work.
    """

    kind = InpaintKind(refiner=True)
    features = (IPAdapterFeature(), ControlNetFeature("control_image"))
    __init__ = classic_init("StableDiffusionXLControlNetImg2ImgPipeline")
    _callback_tensor_inputs: ClassVar[list[str]] = [
        *IMAGE_CALLBACK_TENSOR_INPUTS, "mask", "masked_image_latents", "control_image", "image",
    ]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        **StableDiffusionXLControlNetPipeline._callback_names, **IMAGE_CALLBACK_NAMES,
        **INPAINT_CALLBACK_NAMES,
    }

    __call__ = classic_call("StableDiffusionXLControlNetInpaintPipeline")
