"""Flux image-to-image on the shared loop (flow matching: the image's latents are mixed with noise)."""

from __future__ import annotations

from .flux import FluxPipeline
from .kinds import Image2ImageKind
from .signatures import classic_call

__all__ = ["FluxImg2ImgPipeline"]


class FluxImg2ImgPipeline(FluxPipeline):
    """Re-draw ``image`` at ``strength``, resized to ``height`` x ``width`` (default 1024 for FLUX.1 models, not the
    image's size); arguments follow the classic pipeline. ``latents``, when given, are the packed start latents
    (used as they are, no noise added), as in the classic pipeline."""

    # the classic pipeline encodes the images as given
    kind = Image2ImageKind(size_from_image=False, repeat_image_for_generators=False, given_latents=True)

    __call__ = classic_call("FluxImg2ImgPipeline")
