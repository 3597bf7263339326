"""Latents <-> images through a VAE, with shift, scale and per-channel statistics handled once.

``encode_images`` is what the classic image-to-image and inpainting pipelines do before adding noise;
``decode_latents`` is what every pipeline does before post-processing. Previews fit and score
against the same functions, so a VAE with ``latents_mean`` / ``latents_std`` (SDXL-style) or a
``shift_factor`` (SD3) is handled the same way everywhere.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ._quiet import quiet_transformers

with quiet_transformers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

__all__ = ["decode_latents", "encode_images", "latent_stats"]

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # VAE -> its lock, for VAEs that upcast
_LOCKS_GUARD = threading.Lock()


@contextmanager
def _float32_if_needed(vae) -> Iterator[bool]:
    """Run the block with ``vae`` in float32 where it is a float16 VAE marked ``force_upcast``; yield whether it was.

    The classic pipelines cast such a VAE to float32 in place and back after the call. A pipeline is shared by
    threads (server workers), so a VAE that can be cast holds a lock for the whole encode or decode: one thread's
    cast never changes the dtype under another thread's call. Other VAEs are never cast and take no lock.
    """
    if not getattr(vae.config, "force_upcast", False):
        yield False
        return
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(vae, threading.Lock())
    with lock:
        upcast = vae.dtype == torch.float16
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            yield upcast
        finally:
            if upcast:
                vae.to(dtype=torch.float16)


def latent_stats(vae, channels: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel (mean, std) of the VAE's latents, as (1, C, 1, 1) tensors, where its config has them."""
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is None or std is None:
        return None
    return (torch.tensor(mean).view(1, channels, 1, 1).to(device, dtype),
            torch.tensor(std).view(1, channels, 1, 1).to(device, dtype))


def encode_images(
    vae, images: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
    sample: bool = True,
) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W) -> scaled latents (B, C, h, w), in the order the classic pipelines use.

    ``sample``: draw from the posterior with ``generator`` (one per row when a list), as the classic
    image-to-image pipelines do; False takes its mode.
    """
    dtype = images.dtype
    mode = "sample" if sample else "argmax"
    with _float32_if_needed(vae) as upcast:  # fp16 VAEs that overflow encode in float32, as the classic SDXL pipelines do
        if upcast:
            images = images.float()
        if isinstance(generator, list):
            latents = torch.cat([
                retrieve_latents(vae.encode(images[i : i + 1]), generator=generator[i], sample_mode=mode)
                for i in range(images.shape[0])
            ])
        else:
            latents = retrieve_latents(vae.encode(images), generator=generator, sample_mode=mode)
    latents = latents.to(dtype)
    cfg = vae.config
    stats = latent_stats(vae, latents.shape[1], latents.device, latents.dtype)
    if stats is not None:
        return (latents - stats[0]) * cfg.scaling_factor / stats[1]
    shift = getattr(cfg, "shift_factor", None)
    if shift is not None:
        return (latents - shift) * cfg.scaling_factor
    return cfg.scaling_factor * latents


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (undo statistics or shift and scale, then decode)."""
    with _float32_if_needed(vae):  # fp16 VAEs that overflow decode in float32, as the classic SDXL pipeline does
        latents = latents.to(vae.dtype)
        cfg = vae.config
        stats = latent_stats(vae, latents.shape[1], latents.device, latents.dtype)
        if stats is not None:
            latents = latents * stats[1] / cfg.scaling_factor + stats[0]
        else:
            latents = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        return vae.decode(latents, return_dict=False)[0]
