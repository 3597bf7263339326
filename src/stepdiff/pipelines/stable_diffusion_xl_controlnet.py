"""Stable Diffusion XL with one or several ControlNets, on the shared loop."""

from __future__ import annotations

from typing import Any, ClassVar

from .components import classic_init
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

    __init__ = classic_init("StableDiffusionXLControlNetPipeline")

    def _init_components(self, modules: dict[str, Any], config: dict[str, Any]) -> None:
        modules["controlnet"] = as_controlnet(modules["controlnet"])
        check_controlnet_fits(modules["controlnet"], modules["unet"])
        super()._init_components(modules, config)

    def controlnet_inputs(self, conditioning: dict) -> dict[str, Any]:
        return {"added_cond_kwargs": {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}}

    __call__ = classic_call("StableDiffusionXLControlNetPipeline")
