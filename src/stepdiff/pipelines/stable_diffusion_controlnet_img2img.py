"""Stable Diffusion 1.x/2.x image-to-image with ControlNets, on the shared loop."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..control import CancelToken
from .controlnet import ControlNetFeature
from .ip_adapter import IPAdapterFeature
from .kinds import Image2ImageKind
from .stable_diffusion_controlnet import StableDiffusionControlNetPipeline

__all__ = ["StableDiffusionControlNetImg2ImgPipeline"]


class StableDiffusionControlNetImg2ImgPipeline(StableDiffusionControlNetPipeline):
    """Re-draw ``image`` at ``strength`` following ``control_image``; arguments follow the classic pipeline.

    The control images are the callback tensor ``control_image`` (classic name) and also ``image``, so the
    official ControlNet callbacks work here.
    """

    kind = Image2ImageKind()
    features = (IPAdapterFeature(), ControlNetFeature("control_image"))
    _callback_tensor_inputs: ClassVar[list[str]] = [
        "latents", "prompt_embeds", "negative_prompt_embeds", "control_image", "image", "denoised",
    ]

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        control_image: Any = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        cancel: CancelToken | None = None,
        interrupt_output: str = "denoised",
    ):
        """Generate images from ``image`` and a prompt, following ``control_image``."""
        return self._call(locals())
