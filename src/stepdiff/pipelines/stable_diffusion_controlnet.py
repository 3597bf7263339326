"""Stable Diffusion 1.x/2.x with one or several ControlNets, on the shared loop."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTokenizer

from ..control import CancelToken
from .controlnet import ControlNetFeature, as_controlnet, check_controlnet_fits
from .ip_adapter import IPAdapterFeature
from .stable_diffusion import StableDiffusionPipeline

__all__ = ["StableDiffusionControlNetPipeline"]


class StableDiffusionControlNetPipeline(StableDiffusionPipeline):
    """Text-to-image guided by control images (``image``); arguments follow the classic pipeline.

    ``controlnet``: a ``ControlNetModel``, a ``MultiControlNetModel`` or a list of ControlNetModel (then ``image``
    is a list with one control image per ControlNet). The control images ride with the rows, so every guidance
    callback (``CFGCutoffCallback``, intervals, schedules) works at any batch size.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    features = (IPAdapterFeature(), ControlNetFeature())
    _callback_tensor_inputs: ClassVar[list[str]] = [
        "latents", "prompt_embeds", "negative_prompt_embeds", "image", "denoised",
    ]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel | MultiControlNetModel | list[ControlNetModel] | tuple[ControlNetModel, ...],
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: Any = None,
        feature_extractor: Any = None,
        image_encoder: Any = None,
        requires_safety_checker: bool = False,
    ) -> None:
        controlnet = as_controlnet(controlnet)
        check_controlnet_fits(controlnet, unet)
        super().__init__(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=safety_checker, feature_extractor=feature_extractor, image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.register_modules(controlnet=controlnet)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        cancel: CancelToken | None = None,
        interrupt_output: str = "denoised",
    ):
        """Generate images following the control ``image``; see ``StableDiffusionPipeline.__call__`` for callbacks.

        ``controlnet_conditioning_scale``: the weight of each ControlNet's residuals (a number, or one per ControlNet);
        ``control_guidance_start`` / ``control_guidance_end``: the fraction of the steps each ControlNet acts on;
        ``guess_mode``: the ControlNets see only the conditional rows (no prompt needed to follow the image).
        """
        return self._call(locals())
