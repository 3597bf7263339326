"""Flux inpainting on the shared loop: the known region is put back, noised to the next step, after every step."""

from __future__ import annotations

from typing import ClassVar

from .flux import FluxPipeline
from .kinds import INPAINT_CALLBACK_NAMES, InpaintKind
from .signatures import classic_call

__all__ = ["FluxInpaintPipeline"]


class FluxInpaintPipeline(FluxPipeline):
    """Repaint the white part of ``mask_image``, resized to ``height`` x ``width``; arguments follow the classic
    pipeline. ``mask`` and ``masked_image_latents`` reach callbacks packed like the latents; ``latents``, when given,
    are the start noise (B, C, h, w), unpacked, as in the classic pipeline."""

    kind = InpaintKind()
    _callback_tensor_inputs: ClassVar[list[str]] = [*FluxPipeline._callback_tensor_inputs, "mask", "masked_image_latents"]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {**FluxPipeline._callback_names, **INPAINT_CALLBACK_NAMES}

    denoiser_channels = FluxPipeline.denoiser_channels

    __call__ = classic_call("FluxInpaintPipeline")
