"""Flux inpainting on the shared loop: the known region is put back, noised to the next step, after every step."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..control import CancelToken
from .flux import FluxPipeline
from .kinds import INPAINT_CALLBACK_NAMES, InpaintKind

__all__ = ["FluxInpaintPipeline"]


class FluxInpaintPipeline(FluxPipeline):
    """Repaint the white part of ``mask_image``, resized to ``height`` x ``width``; arguments follow the classic
    pipeline. ``mask`` and ``masked_image_latents`` reach callbacks packed like the latents; ``latents``, when given,
    are the start noise (B, C, h, w), unpacked, as in the classic pipeline."""

    kind = InpaintKind()
    _callback_tensor_inputs: ClassVar[list[str]] = [*FluxPipeline._callback_tensor_inputs, "mask", "masked_image_latents"]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {**FluxPipeline._callback_names, **INPAINT_CALLBACK_NAMES}

    denoiser_channels = FluxPipeline.denoiser_channels

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.6,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: Any = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = 512,
        cancel: CancelToken | None = None,
        interrupt_output: str = "denoised",
    ):
        """Inpaint ``image`` under ``mask_image``; see ``FluxPipeline.__call__`` for the guidance arguments."""
        return self._call(locals())
