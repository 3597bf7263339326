"""Flux image-to-image on the shared loop (flow matching: the image's latents are mixed with noise)."""

from __future__ import annotations

from typing import Any

import torch

from ..control import CancelToken
from .flux import FluxPipeline
from .kinds import Image2ImageKind

__all__ = ["FluxImg2ImgPipeline"]


class FluxImg2ImgPipeline(FluxPipeline):
    """Re-draw ``image`` at ``strength``, resized to ``height`` x ``width`` (default 1024 for FLUX.1 models, not the
    image's size); arguments follow the classic pipeline. ``latents``, when given, are the packed start latents
    (used as they are, no noise added), as in the classic pipeline."""

    # the classic pipeline encodes the images as given
    kind = Image2ImageKind(size_from_image=False, repeat_image_for_generators=False, given_latents=True)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        image: Any = None,
        height: int | None = None,
        width: int | None = None,
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
        """Generate images from ``image`` and a prompt; see ``FluxPipeline.__call__`` for the guidance arguments."""
        return self._call(locals())
