"""Stable Diffusion 3 inpainting on the shared loop (SD3 transformers, and 33-channel inpainting transformers)."""

from __future__ import annotations

from typing import ClassVar

from .kinds import INPAINT_CALLBACK_NAMES, InpaintKind
from .signatures import classic_call
from .stable_diffusion_3 import StableDiffusion3Pipeline

__all__ = ["StableDiffusion3InpaintPipeline"]


class StableDiffusion3InpaintPipeline(StableDiffusion3Pipeline):
    """Repaint the white part of ``mask_image``, resized to ``height`` x ``width``; arguments follow the classic pipeline.

    A transformer with as many input channels as the VAE has latent channels (SD3, SD3.5) gets the known region put
    back, noised to the next step, after every step; one with ``2 * latent + 1`` (33 for SD3's 16-channel VAE) sees
    the mask and the masked image's latents as input channels. Decoding applies the VAE's ``shift_factor``, as every
    other SD3 pipeline does (the classic inpainting pipeline leaves it out: see docs/what-differs.md).
    """

    kind = InpaintKind()
    _callback_tensor_inputs: ClassVar[list[str]] = [
        *StableDiffusion3Pipeline._callback_tensor_inputs, "mask", "masked_image_latents",
    ]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        **StableDiffusion3Pipeline._callback_names,
        **INPAINT_CALLBACK_NAMES,
    }

    __call__ = classic_call("StableDiffusion3InpaintPipeline")
