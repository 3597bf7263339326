"""Flux image-to-image on the shared loop (flow matching: the image's latents are mixed with noise)."""

from __future__ import annotations

from typing import ClassVar

import torch

from .flux import FluxPipeline
from .kinds import Image2ImageRun
from .run import Run
from .signatures import classic_call

__all__ = ["FluxImg2ImgPipeline"]


class FluxImg2ImgPipeline(Image2ImageRun, FluxPipeline):
    """Re-draw ``image`` at ``strength``, resized to ``height`` x ``width`` (default 1024 for FLUX.1 models, not the
    image's size); arguments follow the classic pipeline. ``latents``, when given, are the packed start latents
    (used as they are, no noise added), as in the classic pipeline."""

    size_from_image: ClassVar[bool] = False
    repeat_image_for_generators: ClassVar[bool] = False  # the classic pipeline encodes the images as given

    def initial_latents(self, run: Run, rows, height, width, dtype, device, generator, latents, kind) -> torch.Tensor:
        if latents is None:
            return super().initial_latents(run, rows, height, width, dtype, device, generator, None, kind)
        shape = (rows, self.latent_channels(), height // self.vae_scale_factor, width // self.vae_scale_factor)
        return self._unpack_given(latents, shape).to(device=device, dtype=dtype)

    __call__ = classic_call("FluxImg2ImgPipeline")
