"""Stable Diffusion XL inpainting with ControlNets, on the shared loop (9-channel inpainting UNets and ordinary ones)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..control import CancelToken
from ._sdxl_kinds import IMAGE_CALLBACK_NAMES, IMAGE_CALLBACK_TENSOR_INPUTS, controlnet_image_init
from .controlnet import ControlNetFeature
from .ip_adapter import IPAdapterFeature
from .kinds import INPAINT_CALLBACK_NAMES, InpaintKind
from .stable_diffusion_xl_controlnet import StableDiffusionXLControlNetPipeline

__all__ = ["StableDiffusionXLControlNetInpaintPipeline"]


class StableDiffusionXLControlNetInpaintPipeline(StableDiffusionXLControlNetPipeline):
    """SDXL: repaint the white part of ``mask_image`` following ``control_image``; arguments follow the classic
    pipeline.

    The ControlNets see the 4-channel latents, also with a 9-channel inpainting UNet. The control images are the
    callback tensor ``control_image`` (classic name) and also ``image``, so the official ControlNet callbacks work.
    """

    kind = InpaintKind(refiner=True)
    features = (IPAdapterFeature(), ControlNetFeature("control_image"))
    __init__ = controlnet_image_init
    _callback_tensor_inputs: ClassVar[list[str]] = [
        *IMAGE_CALLBACK_TENSOR_INPUTS, "mask", "masked_image_latents", "control_image", "image",
    ]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        **StableDiffusionXLControlNetPipeline._callback_names, **IMAGE_CALLBACK_NAMES,
        **INPAINT_CALLBACK_NAMES,
    }

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        control_image: Any = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        cancel: CancelToken | None = None,
        interrupt_output: str = "denoised",
    ):
        """Inpaint ``image`` under ``mask_image`` following ``control_image``; see
        ``StableDiffusionXLControlNetPipeline.__call__`` for the ControlNet arguments and callbacks."""
        return self._call(locals())
