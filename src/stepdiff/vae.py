"""Latents <-> images through a VAE, with shift, scale and per-channel statistics handled once.

``encode_images`` is what the classic image-to-image and inpainting pipelines do before adding noise;
``decode_latents`` is what every pipeline does before post-processing. Previews fit and score
against the same functions, so a VAE with ``latents_mean`` / ``latents_std`` (SDXL-style) or a
``shift_factor`` (SD3) is handled the same way everywhere.
"""

from __future__ import annotations

import torch

from ._quiet import quiet_transformers

with quiet_transformers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

__all__ = ["decode_latents", "encode_images", "latent_stats"]


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
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = images.dtype
    if upcast:  # fp16 VAEs that overflow encode in float32, as the classic SDXL pipelines do
        images = images.float()
        vae.to(dtype=torch.float32)
    mode = "sample" if sample else "argmax"
    if isinstance(generator, list):
        latents = torch.cat([
            retrieve_latents(vae.encode(images[i : i + 1]), generator=generator[i], sample_mode=mode)
            for i in range(images.shape[0])
        ])
    else:
        latents = retrieve_latents(vae.encode(images), generator=generator, sample_mode=mode)
    if upcast:
        vae.to(dtype=torch.float16)
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
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:  # fp16 VAEs that overflow decode in float32, as the classic SDXL pipeline does
        vae.to(dtype=torch.float32)
    latents = latents.to(vae.dtype)
    cfg = vae.config
    stats = latent_stats(vae, latents.shape[1], latents.device, latents.dtype)
    if stats is not None:
        latents = latents * stats[1] / cfg.scaling_factor + stats[0]
    else:
        latents = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    image = vae.decode(latents, return_dict=False)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    return image
