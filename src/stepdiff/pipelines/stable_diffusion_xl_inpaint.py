"""Stable Diffusion XL inpainting on the shared loop (9-channel inpainting UNets and ordinary ones)."""

from __future__ import annotations

from typing import ClassVar

from ._sdxl_kinds import IMAGE_CALLBACK_NAMES, IMAGE_CALLBACK_TENSOR_INPUTS
from .components import classic_init
from .kinds import INPAINT_CALLBACK_NAMES, InpaintKind
from .signatures import classic_call
from .stable_diffusion_xl import StableDiffusionXLPipeline

__all__ = ["StableDiffusionXLInpaintPipeline"]


class StableDiffusionXLInpaintPipeline(StableDiffusionXLPipeline):
    """Repaint the white part of ``mask_image``; arguments follow the classic pipeline."""

    kind = InpaintKind(refiner=True)
    __init__ = classic_init("StableDiffusionXLImg2ImgPipeline")
    _callback_tensor_inputs: ClassVar[list[str]] = [*IMAGE_CALLBACK_TENSOR_INPUTS, "mask", "masked_image_latents"]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        **IMAGE_CALLBACK_NAMES,
        **INPAINT_CALLBACK_NAMES,
    }

    __call__ = classic_call("StableDiffusionXLInpaintPipeline")
