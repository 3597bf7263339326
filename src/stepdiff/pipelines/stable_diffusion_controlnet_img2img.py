"""Stable Diffusion 1.x/2.x image-to-image with ControlNets, on the shared loop."""

from __future__ import annotations

from typing import Any, ClassVar

from .kinds import Image2ImageRun
from .signatures import classic_call
from .stable_diffusion_controlnet import StableDiffusionControlNetPipeline

__all__ = ["StableDiffusionControlNetImg2ImgPipeline"]


class StableDiffusionControlNetImg2ImgPipeline(Image2ImageRun, StableDiffusionControlNetPipeline):
    """Re-draw ``image`` at ``strength`` following ``control_image``; arguments follow the classic pipeline.

    The control images are the callback tensor ``control_image`` (classic name) and also ``image``, so the
    official ControlNet callbacks work here.
    """

    _control_image_name: ClassVar[str] = "control_image"
    _control_tensor_names: ClassVar[tuple[str, ...]] = ("control_image", "image")
    _callback_tensor_inputs: ClassVar[list[str]] = [
        "latents", "prompt_embeds", "negative_prompt_embeds", "control_image", "image", "denoised",
    ]

    def check_kind_inputs(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.match_init_image(super().check_kind_inputs(args), args)

    __call__ = classic_call("StableDiffusionControlNetImg2ImgPipeline")
