"""Stable Diffusion 1.x/2.x with one or several ControlNets, on the shared loop."""

from __future__ import annotations

from typing import Any, ClassVar

from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTokenizer

from .controlnet import ControlNetFeature, as_controlnet, check_controlnet_fits
from .ip_adapter import IPAdapterFeature
from .signatures import classic_call
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

    __call__ = classic_call("StableDiffusionControlNetPipeline")
