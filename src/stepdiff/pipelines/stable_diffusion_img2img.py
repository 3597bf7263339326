"""Stable Diffusion 1.x/2.x image-to-image on the shared loop."""

from __future__ import annotations

from typing import Any

import torch

from ..control import CancelToken
from .kinds import Image2ImageKind
from .stable_diffusion import StableDiffusionPipeline

__all__ = ["StableDiffusionImg2ImgPipeline"]


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """Re-draw ``image`` at ``strength`` (0: keep it, 1: ignore it); arguments follow the classic pipeline."""

    kind = Image2ImageKind()

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.8,
        num_inference_steps: int | None = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        cancel: CancelToken | None = None,
        interrupt_output: str = "denoised",
    ):
        """Generate images from ``image`` and a prompt; see ``StableDiffusionPipeline.__call__`` for callbacks."""
        return self._call(locals())
