"""Stable Diffusion XL inpainting on the shared loop (9-channel inpainting UNets and ordinary ones)."""

from __future__ import annotations

from typing import ClassVar

from ._sdxl_kinds import SDXLImageMixin
from .kinds import INPAINT_CALLBACK_NAMES, InpaintRun
from .signatures import classic_call
from .stable_diffusion_xl import StableDiffusionXLPipeline

__all__ = ["StableDiffusionXLInpaintPipeline"]


class StableDiffusionXLInpaintPipeline(SDXLImageMixin, InpaintRun, StableDiffusionXLPipeline):
    """Repaint the white part of ``mask_image``; arguments follow the classic pipeline."""

    _callback_tensor_inputs: ClassVar[list[str]] = [*SDXLImageMixin._callback_tensor_inputs, "mask", "masked_image_latents"]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        **SDXLImageMixin._callback_names,
        **INPAINT_CALLBACK_NAMES,
    }

    __call__ = classic_call("StableDiffusionXLInpaintPipeline")
