"""Stable Diffusion 3 image-to-image on the shared loop (flow matching: the image is mixed with noise)."""

from __future__ import annotations

from typing import Any

import torch

from ..control import CancelToken
from .kinds import Image2ImageKind
from .stable_diffusion_3 import StableDiffusion3Pipeline

__all__ = ["StableDiffusion3Img2ImgPipeline"]


class StableDiffusion3Img2ImgPipeline(StableDiffusion3Pipeline):
    """Re-draw ``image`` at ``strength``, resized to ``height`` x ``width``; arguments follow the classic pipeline."""

    kind = Image2ImageKind(size_from_image=False)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        image: Any = None,
        strength: float = 0.6,
        num_inference_steps: int | None = 50,
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
        """Generate images from ``image`` and a prompt; see ``StableDiffusionPipeline.__call__`` for callbacks."""
        return self._call(locals())
