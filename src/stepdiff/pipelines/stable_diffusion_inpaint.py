"""Stable Diffusion 1.x/2.x inpainting on the shared loop (9-channel inpainting UNets and ordinary ones)."""

from __future__ import annotations

from typing import ClassVar

from .kinds import INPAINT_CALLBACK_NAMES, InpaintKind
from .signatures import classic_call
from .stable_diffusion import StableDiffusionPipeline

__all__ = ["StableDiffusionInpaintPipeline"]


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    """Repaint the white part of ``mask_image``; arguments follow the classic pipeline."""

    kind = InpaintKind()

    _callback_tensor_inputs: ClassVar[list[str]] = [
        *StableDiffusionPipeline._callback_tensor_inputs, "mask", "masked_image_latents",
    ]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        **StableDiffusionPipeline._callback_names,
        **INPAINT_CALLBACK_NAMES,
    }

    __call__ = classic_call("StableDiffusionInpaintPipeline")
