"""Stable Diffusion 1.x/2.x image-to-image with ControlNets, on the shared loop."""

from __future__ import annotations

from typing import ClassVar

from .controlnet import ControlNetFeature
from .ip_adapter import IPAdapterFeature
from .kinds import Image2ImageKind
from .signatures import classic_call
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

    __call__ = classic_call("StableDiffusionControlNetImg2ImgPipeline")
