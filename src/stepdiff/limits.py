"""What a run may ask for and what it will need, known before any weights load: the limits every caller
checks a request against (defined here once), the model's native size and a memory estimate.

Everything here reads only the JSON configs and file sizes of a model folder, so the CLI can refuse a
size or a batch that cannot work before it allocates anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "DEFAULT_GUIDANCE", "MAX_CONTROL_SCALE", "MAX_GUIDANCE", "MAX_SEED", "MAX_STEPS",
    "SIZE_LIMIT_RATIO", "SIZE_WARN_RATIO", "ModelShape", "device_memory", "estimate_memory", "format_bytes",
]

# What a request (CLI flags, batch rows, studio jobs: stepdiff.request) may ask for.
MAX_GUIDANCE = 100.0  # beyond this the guided prediction saturates: black or white images, or NaN
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds
MAX_STEPS = 10_000
MAX_CONTROL_SCALE = 10.0
SIZE_WARN_RATIO = 2  # a size above this many times the native size (per side): a warning
SIZE_LIMIT_RATIO = 8  # ... above this: refused (the CLI's --force lets it through)
DEFAULT_GUIDANCE = 7.5  # a model folder that recommends none (its stepdiff.json) gets the convention's scale
# (A library call accepts guidance scales up to stepdiff.guidance.MAX_GUIDANCE_SCALE, 1000: it is refused only where it
# cannot work, a request where it cannot look right.)

# Peak bytes per pixel of one image, in units of (channels x bytes per element) at the denoiser's widest
# level and at the VAE decoder's full-resolution level. Measured on the shipped model (torch 2.13, CPU,
# float32, SDPA attention, whose memory grows linearly with the pixels): denoiser 2 rows at 512x512
# 171 MB over the loaded model (K = 20), decode 318 MB (K = 19); rounded up.
_K_DENOISER = 24
_K_DECODER = 20
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_RUNTIME = 512 * 2**20  # Python, torch and the text encoders' working memory


def _config(folder: Path, name: str) -> dict:
    path = folder / name / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is missing or not valid JSON: {e}") from None


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a run's memory: from a model folder's configs, no weights loaded."""

    native_size: int  # pixels per side the denoiser was configured for (sample_size x VAE factor)
    vae_scale_factor: int
    denoiser_width: int  # channels at the denoiser's widest-resolution level (UNet) or hidden size (MMDiT)
    pixels_per_token: int  # image pixels per denoiser position: factor**2, times patch**2 for a transformer
    decoder_width: int  # VAE decoder channels at full resolution
    weight_bytes: int
    size_multiple: int = 8  # width and height must be multiples of this
    min_size: int = 8  # the smallest side whose latents survive every down-sampling of the denoiser

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> ModelShape:
        folder = Path(folder)
        if folder.is_file():  # a single-file checkpoint: its derived configs, the file's size as the weights
            from .single_file.folder import config_folder

            return replace(cls.from_folder(config_folder(folder)), weight_bytes=folder.stat().st_size)
        vae = _config(folder, "vae")
        factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
        if (folder / "transformer").is_dir():
            den = _config(folder, "transformer")
            patch = int(den.get("patch_size", 2))
            width = int(den.get("num_attention_heads", 1)) * int(den.get("attention_head_dim", 64))
            levels = 1
        else:
            den = _config(folder, "unet")
            patch, width = 1, int(den.get("block_out_channels", [320])[0])
            levels = len(den.get("block_out_channels", [320]))
        sample = den.get("sample_size", 64)
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        weights = sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
        return cls(
            native_size=int(sample) * factor, vae_scale_factor=factor, denoiser_width=width,
            pixels_per_token=(factor * patch) ** 2, decoder_width=int(vae.get("block_out_channels", [128])[0]),
            weight_bytes=weights, size_multiple=max(8, factor * patch),
            min_size=max(8, factor * patch * 2 ** (levels - 1)),
        )


def estimate_memory(shape: ModelShape, width: int, height: int, images: int, dtype: str = "float32") -> int:
    """Peak bytes of one guided call making ``images`` images of ``width`` x ``height``: the weights, the
    denoiser's activations (two rows per image) or the VAE decode of every image at once, whichever is
    larger, and the finished images. An estimate, good to a factor of about two."""
    pixels = width * height
    per_token = shape.denoiser_width * _BYTES.get(dtype, 4) * _K_DENOISER
    denoiser = 2 * images * (pixels // shape.pixels_per_token + 1) * per_token
    decoder = images * pixels * shape.decoder_width * 4 * _K_DECODER  # the VAE decodes in float32
    return _RUNTIME + shape.weight_bytes + max(denoiser, decoder) + images * pixels * 3 * 5  # float + uint8 copies


def device_memory(device: str) -> int | None:
    """Total memory of ``device`` (this machine's RAM for cpu and mps), or None where it can't be read."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None


def format_bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    k = 0
    while n >= 1024 and k < len(units) - 1:
        n, k = n / 1024, k + 1
    return f"{n:.0f} B" if k == 0 else f"{n:.1f} {units[k]}"
