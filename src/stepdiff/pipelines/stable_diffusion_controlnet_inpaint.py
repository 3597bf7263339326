"""Stable Diffusion 1.x/2.x inpainting with ControlNets, on the shared loop (9-channel inpainting UNets and ordinary ones)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..control import CancelToken
from .controlnet import ControlNetFeature
from .ip_adapter import IPAdapterFeature
from .kinds import INPAINT_CALLBACK_NAMES, InpaintKind
from .stable_diffusion_controlnet import StableDiffusionControlNetPipeline

__all__ = ["StableDiffusionControlNetInpaintPipeline"]


class StableDiffusionControlNetInpaintPipeline(StableDiffusionControlNetPipeline):
    """Repaint the white part of ``mask_image`` following ``control_image``; arguments follow the classic pipeline.

    The ControlNets see the 4-channel latents (as the classic pipeline), also with a 9-channel inpainting UNet.
    The control images are the callback tensor ``control_image`` (classic name) and also ``image``, so the official
    ControlNet callbacks work here.
    """

    kind = InpaintKind()
    features = (IPAdapterFeature(), ControlNetFeature("control_image"))
    _callback_tensor_inputs: ClassVar[list[str]] = [
        "latents", "prompt_embeds", "negative_prompt_embeds", "control_image", "image", "mask", "masked_image_latents",
        "denoised",
    ]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        **StableDiffusionControlNetPipeline._callback_names,
        **INPAINT_CALLBACK_NAMES,
    }

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        control_image: Any = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
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
        controlnet_conditioning_scale: float | list[float] = 0.5,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        cancel: CancelToken | None = None,
        interrupt_output: str = "denoised",
    ):
        """Inpaint ``image`` under ``mask_image`` following ``control_image``; see
        ``StableDiffusionControlNetPipeline.__call__`` for the ControlNet arguments and callbacks."""
        return self._call(locals())
