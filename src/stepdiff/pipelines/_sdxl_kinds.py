"""What SDXL's image-to-image and inpainting pipelines share besides their kind object: the constructors with
``requires_aesthetics_score`` (plain and with ControlNets) and the callback tensor ``add_neg_time_ids``. The
aesthetic-score micro-conditioning and ``denoising_start`` are the family's and the kind's
(``stable_diffusion_xl.image_time_id_lists``, ``Image2ImageKind(refiner=True)``)."""

from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .stable_diffusion_xl import StableDiffusionXLPipeline
from .stable_diffusion_xl_controlnet import StableDiffusionXLControlNetPipeline

__all__ = ["IMAGE_CALLBACK_NAMES", "IMAGE_CALLBACK_TENSOR_INPUTS", "controlnet_image_init", "image_init"]

IMAGE_CALLBACK_TENSOR_INPUTS: list[str] = [*StableDiffusionXLPipeline._callback_tensor_inputs, "add_neg_time_ids"]
IMAGE_CALLBACK_NAMES: dict[str, tuple[str, str]] = {
    **StableDiffusionXLPipeline._callback_names, "add_neg_time_ids": ("uncond", "time_ids"),
}


def image_init(
    self: Any,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    tokenizer: CLIPTokenizer,
    tokenizer_2: CLIPTokenizer,
    unet: UNet2DConditionModel,
    scheduler: KarrasDiffusionSchedulers,
    image_encoder: Any = None,
    feature_extractor: Any = None,
    requires_aesthetics_score: bool = False,
    force_zeros_for_empty_prompt: bool = True,
    add_watermarker: bool | None = None,
) -> None:
    """The classic SDXL image pipelines' constructor: SDXL's, and ``requires_aesthetics_score`` (refiners)."""
    StableDiffusionXLPipeline.__init__(
        self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder=image_encoder,
        feature_extractor=feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )
    self.register_to_config(requires_aesthetics_score=requires_aesthetics_score)


def controlnet_image_init(
    self: Any,
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
    """The classic SDXL ControlNet image pipelines' constructor: the ControlNet pipeline's, and
    ``requires_aesthetics_score``."""
    StableDiffusionXLControlNetPipeline.__init__(
        self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet, scheduler,  # type: ignore[arg-type]
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, feature_extractor=feature_extractor,
        image_encoder=image_encoder,
    )
    self.register_to_config(requires_aesthetics_score=requires_aesthetics_score)
