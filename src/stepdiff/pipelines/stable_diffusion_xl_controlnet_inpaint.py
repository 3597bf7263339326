"""Stable Diffusion XL inpainting with ControlNets, on the shared loop (9-channel inpainting UNets and ordinary ones)."""

from __future__ import annotations

from typing import ClassVar

from ._sdxl_kinds import SDXLControlNetImageMixin, SDXLImageMixin
from .kinds import INPAINT_CALLBACK_NAMES, InpaintRun
from .signatures import classic_call
from .stable_diffusion_xl_controlnet import StableDiffusionXLControlNetPipeline

__all__ = ["StableDiffusionXLControlNetInpaintPipeline"]


class StableDiffusionXLControlNetInpaintPipeline(SDXLControlNetImageMixin, InpaintRun, StableDiffusionXLControlNetPipeline):
    """SDXL: repaint the white part of ``mask_image`` following ``control_image``; arguments follow the classic
    pipeline.

    The ControlNets see the 4-channel latents, also with a 9-channel inpainting UNet. The control images are the
    callback tensor ``control_image`` (classic name) and also ``image``, so the official ControlNet callbacks work.
    """

    _callback_tensor_inputs: ClassVar[list[str]] = [
        *SDXLImageMixin._callback_tensor_inputs, "mask", "masked_image_latents", "control_image", "image",
    ]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        **StableDiffusionXLControlNetPipeline._callback_names, **SDXLImageMixin._callback_names,
        **INPAINT_CALLBACK_NAMES,
    }

    __call__ = classic_call("StableDiffusionXLControlNetInpaintPipeline")
