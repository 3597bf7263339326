"""Stable Diffusion 3 image-to-image on the shared loop (flow matching: the image is mixed with noise)."""

from __future__ import annotations

from .kinds import Image2ImageKind
from .signatures import classic_call
from .stable_diffusion_3 import StableDiffusion3Pipeline

__all__ = ["StableDiffusion3Img2ImgPipeline"]


class StableDiffusion3Img2ImgPipeline(StableDiffusion3Pipeline):
    """Re-draw ``image`` at ``strength``, resized to ``height`` x ``width``; arguments follow the classic pipeline."""

    kind = Image2ImageKind(size_from_image=False)

    __call__ = classic_call("StableDiffusion3Img2ImgPipeline")
