"""Stable Diffusion XL inpainting on the shared loop (9-channel inpainting UNets and ordinary ones)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..control import CancelToken
from ._sdxl_kinds import IMAGE_CALLBACK_NAMES, IMAGE_CALLBACK_TENSOR_INPUTS, image_init
from .kinds import INPAINT_CALLBACK_NAMES, InpaintKind
from .stable_diffusion_xl import StableDiffusionXLPipeline

__all__ = ["StableDiffusionXLInpaintPipeline"]


class StableDiffusionXLInpaintPipeline(StableDiffusionXLPipeline):
    """Repaint the white part of ``mask_image``; arguments follow the classic pipeline."""

    kind = InpaintKind(refiner=True)
    __init__ = image_init
    _callback_tensor_inputs: ClassVar[list[str]] = [*IMAGE_CALLBACK_TENSOR_INPUTS, "mask", "masked_image_latents"]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        **IMAGE_CALLBACK_NAMES,
        **INPAINT_CALLBACK_NAMES,
    }

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int | None = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        cancel: CancelToken | None = None,
        interrupt_output: str = "denoised",
    ):
        """Inpaint ``image`` under ``mask_image``; see ``StableDiffusionPipeline.__call__`` for callbacks."""
        return self._call(locals())
