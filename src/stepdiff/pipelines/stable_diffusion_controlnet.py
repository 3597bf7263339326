"""Stable Diffusion 1.x/2.x with one or several ControlNets, on the shared loop."""

from __future__ import annotations

from typing import Any, ClassVar

from .components import classic_init
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

    __init__ = classic_init("StableDiffusionControlNetPipeline")

    def _init_components(self, modules: dict[str, Any], config: dict[str, Any]) -> None:
        modules["controlnet"] = as_controlnet(modules["controlnet"])
        check_controlnet_fits(modules["controlnet"], modules["unet"])
        super()._init_components(modules, config)

    __call__ = classic_call("StableDiffusionControlNetPipeline")
