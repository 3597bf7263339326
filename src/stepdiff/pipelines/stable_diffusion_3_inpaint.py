"""Stable Diffusion 3 inpainting on the shared loop (SD3 transformers, and 33-channel inpainting transformers)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..control import CancelToken
from .kinds import INPAINT_CALLBACK_NAMES, InpaintKind
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

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.6,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = 256,
        mu: float | None = None,
        cancel: CancelToken | None = None,
        interrupt_output: str = "denoised",
    ):
        """Inpaint ``image`` under ``mask_image``; see ``StableDiffusionPipeline.__call__`` for callbacks."""
        return self._call(locals())
