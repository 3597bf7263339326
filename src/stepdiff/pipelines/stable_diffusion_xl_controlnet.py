"""Stable Diffusion XL with one or several ControlNets, on the shared loop."""

from __future__ import annotations

from typing import Any, ClassVar

from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .controlnet import ControlNetFeature, as_controlnet, check_controlnet_fits
from .ip_adapter import IPAdapterFeature
from .signatures import classic_call
from .stable_diffusion_xl import StableDiffusionXLPipeline

__all__ = ["StableDiffusionXLControlNetPipeline"]


class StableDiffusionXLControlNetPipeline(StableDiffusionXLPipeline):
    """SDXL text-to-image guided by control images (``image``); arguments follow the classic pipeline.

    See ``StableDiffusionControlNetPipeline``; the ControlNets also get each row's pooled text embeddings and time
    ids, which ride with the rows like the control images.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    features = (IPAdapterFeature(), ControlNetFeature())
    _callback_tensor_inputs: ClassVar[list[str]] = [
        "latents", "prompt_embeds", "negative_prompt_embeds", "add_text_embeds", "add_time_ids",
        "negative_pooled_prompt_embeds", "negative_add_time_ids", "image", "denoised",
    ]

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
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        feature_extractor: Any = None,
        image_encoder: Any = None,
    ) -> None:
        controlnet = as_controlnet(controlnet)
        check_controlnet_fits(controlnet, unet)
        super().__init__(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
            feature_extractor=feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        )
        self.register_modules(controlnet=controlnet)

    def controlnet_inputs(self, conditioning: dict) -> dict[str, Any]:
        return {"added_cond_kwargs": {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}}

    __call__ = classic_call("StableDiffusionXLControlNetPipeline")
