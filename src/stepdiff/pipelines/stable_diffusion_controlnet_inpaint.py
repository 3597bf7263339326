"""Stable Diffusion 1.x/2.x inpainting with ControlNets, on the shared loop (9-channel inpainting UNets and ordinary ones)."""

from __future__ import annotations

from typing import ClassVar

from .controlnet import ControlNetFeature
from .ip_adapter import IPAdapterFeature
from .kinds import INPAINT_CALLBACK_NAMES, InpaintKind
from .signatures import classic_call
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

    __call__ = classic_call("StableDiffusionControlNetInpaintPipeline")
