"""What SDXL's image-to-image and inpainting pipelines share besides their kind object and constructor
(``components.INITS``): the callback tensor ``add_neg_time_ids``. The aesthetic-score micro-conditioning and
``denoising_start`` are the family's and the kind's (``stable_diffusion_xl.image_time_id_lists``,
``Image2ImageKind(refiner=True)``)."""

from __future__ import annotations

from .stable_diffusion_xl import StableDiffusionXLPipeline

__all__ = ["IMAGE_CALLBACK_NAMES", "IMAGE_CALLBACK_TENSOR_INPUTS"]

IMAGE_CALLBACK_TENSOR_INPUTS: list[str] = [*StableDiffusionXLPipeline._callback_tensor_inputs, "add_neg_time_ids"]
IMAGE_CALLBACK_NAMES: dict[str, tuple[str, str]] = {
    **StableDiffusionXLPipeline._callback_names, "add_neg_time_ids": ("uncond", "time_ids"),
}
