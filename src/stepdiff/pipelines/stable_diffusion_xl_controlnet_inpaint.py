"""Stable Diffusion XL inpainting with ControlNets, on the shared loop (9-channel inpainting UNets and ordinary ones)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..control import CancelToken
from ._sdxl_kinds import SDXLImageMixin
from .kinds import InpaintRun
from .stable_diffusion_xl_controlnet import StableDiffusionXLControlNetPipeline

__all__ = ["StableDiffusionXLControlNetInpaintPipeline"]


class StableDiffusionXLControlNetInpaintPipeline(SDXLImageMixin, InpaintRun, StableDiffusionXLControlNetPipeline):
    """SDXL: repaint the white part of ``mask_image`` following ``control_image``; arguments follow the classic
    pipeline.

    The ControlNets see the 4-channel latents, also with a 9-channel inpainting UNet. The control images are the
    callback tensor ``control_image`` (classic name) and also ``image``, so the official ControlNet callbacks work.
    """

    _control_image_name: ClassVar[str] = "control_image"
    _control_tensor_names: ClassVar[tuple[str, ...]] = ("control_image", "image")
    _callback_tensor_inputs: ClassVar[list[str]] = [
        *SDXLImageMixin._callback_tensor_inputs, "mask", "masked_image_latents", "control_image", "image",
    ]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        **StableDiffusionXLControlNetPipeline._callback_names, **SDXLImageMixin._callback_names,
        "mask": ("cond", "mask"), "masked_image_latents": ("cond", "masked_image_latents"),
    }

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel | MultiControlNetModel | list[ControlNetModel] | tuple[ControlNetModel, ...],
        scheduler: KarrasDiffusionSchedulers,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        feature_extractor: Any = None,
        image_encoder: Any = None,
    ) -> None:
        # The ControlNet pipeline's constructor (SDXLImageMixin's takes no controlnet).
        StableDiffusionXLControlNetPipeline.__init__(
            self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet, scheduler,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_to_config(requires_aesthetics_score=requires_aesthetics_score)

    def check_kind_inputs(self, args: dict[str, Any]) -> dict[str, Any]:
        kind = self.match_init_image(super().check_kind_inputs(args), args)
        if kind["denoising_start"] is not None:
            raise NotImplementedError("denoising_start is not supported by stepdiff's SDXL inpainting yet; use strength")
        return kind

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
