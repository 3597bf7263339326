"""Previews of intermediate steps: latents -> RGB without the VAE, for every latent family.

Built-in linear tables (rgb in [-1, 1] = latents @ factors + bias, latents as the sampler sees them)
for the SD 1.x, SDXL, SD3 and Flux latent spaces; numbers from the sources named in
``data/latent_rgb_factors.json`` (InvokeAI, Apache-2.0; ComfyUI, numbers only). For any other VAE,
``fit_latent_rgb`` fits a table by least squares and ``LatentRGBTable.save`` stores it in the model
folder (``latent_rgb.json``), where ``table_for`` finds it before any built-in table.

A tiny decoder (``method="tiny"``) is a small convolutional decoder distilled from a VAE's decoder,
loaded with diffusers' ``AutoencoderTiny``: the model folder's ``preview_decoder/`` subfolder, or any
local TAESD / TAESDXL / TAESD3 / TAEF1 folder passed as ``tiny_decoder``. It takes the latents as the
sampler sees them and undoes its own ``scaling_factor`` / ``shift_factor`` (1 and 0 for TAESD).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .images import IMAGE_FORMATS, atomic_write, check_writable_dir

__all__ = [
    "FITTED_TABLE_FILE",
    "PREVIEW_DECODER_DIR",
    "LatentRGBTable",
    "PreviewCallback",
    "builtin_tables",
    "contact_sheet",
    "fit_latent_rgb",
    "load_tiny_decoder",
    "preview_psnr",
    "table_for",
    "tiny_decode",
    "tiny_decoder_folder",
]

FITTED_TABLE_FILE = "latent_rgb.json"
PREVIEW_DECODER_DIR = "preview_decoder"
_SOURCES = ("denoised", "latents")
_METHODS = ("linear", "vae", "tiny", "auto")


@dataclass(frozen=True)
class LatentRGBTable:
    """rgb[-1..1] = latents(C) @ factors(C x 3) + bias."""

    name: str
    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float]
    source: str
    scaling_factor: float | None = None

    @property
    def channels(self) -> int:
        return len(self.factors)

    def to_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) or (C, h, w) latents -> RGB in [-1, 1], same leading shape, 3 channels."""
        if latents.shape[-3] != self.channels:
            raise ValueError(
                f"latent-to-RGB table {self.name!r} has {self.channels} channels but the latents have "
                f"{latents.shape[-3]}; fit one for this model with fit_latent_rgb / `stepdiff fit-preview`"
            )
        factors = torch.tensor(self.factors, dtype=torch.float32, device=latents.device)
        bias = torch.tensor(self.bias, dtype=torch.float32, device=latents.device)
        rgb = torch.einsum("...chw,cr->...rhw", latents.float(), factors) + bias[:, None, None]
        return rgb

    def to_image(self, latents: torch.Tensor) -> Image.Image:
        """One (C, h, w) latent -> a PIL image at latent resolution."""
        return rgb_to_image(self.to_rgb(latents))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "factors": [list(r) for r in self.factors], "bias": list(self.bias),
                "source": self.source, "scaling_factor": self.scaling_factor}

    def save(self, folder: str | Path) -> Path:
        data = json.dumps(self.to_json(), indent=1).encode()
        return atomic_write(Path(folder) / FITTED_TABLE_FILE, lambda f: f.write(data))

    @classmethod
    def load(cls, path: str | Path) -> LatentRGBTable:
        data = json.loads(Path(path).read_text())
        return cls(name=data["name"], factors=tuple(tuple(r) for r in data["factors"]), bias=tuple(data["bias"]),
                   source=data["source"], scaling_factor=data.get("scaling_factor"))


def rgb_to_image(rgb: torch.Tensor) -> Image.Image:
    """(3, h, w) in [-1, 1] -> PIL RGB."""
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def builtin_tables() -> dict[str, LatentRGBTable]:
    data = json.loads(resources.files("stepdiff").joinpath("data/latent_rgb_factors.json").read_text())
    return {
        name: LatentRGBTable(name=name, factors=tuple(tuple(r) for r in fam["factors"]), bias=tuple(fam["bias"]),
                             source=fam["source"], scaling_factor=fam["vae_scaling_factor"])
        for name, fam in data["families"].items()
    }


def table_for(pipeline: Any) -> LatentRGBTable:
    """The model folder's fitted table if it has one, else the built-in table of its latent family."""
    folder = getattr(getattr(pipeline, "config", None), "_name_or_path", None)
    if folder and (Path(folder) / FITTED_TABLE_FILE).is_file():
        return LatentRGBTable.load(Path(folder) / FITTED_TABLE_FILE)
    vae_cfg = pipeline.vae.config
    channels = vae_cfg.latent_channels
    candidates = [t for t in builtin_tables().values() if t.channels == channels]
    if not candidates:
        raise ValueError(
            f"no built-in latent-to-RGB table has {channels} channels; fit one with `stepdiff fit-preview MODEL_DIR`"
        )
    # The family whose VAE scaling factor is closest (on a log scale) to this VAE's.
    return min(candidates, key=lambda t: abs(math.log(t.scaling_factor / vae_cfg.scaling_factor)))


def tiny_decoder_folder(pipeline: Any) -> Path | None:
    """The model folder's ``preview_decoder/`` subfolder when it has one, else None."""
    folder = getattr(getattr(pipeline, "config", None), "_name_or_path", None)
    if folder and (Path(folder) / PREVIEW_DECODER_DIR / "config.json").is_file():
        return Path(folder) / PREVIEW_DECODER_DIR
    return None


def load_tiny_decoder(folder: str | Path, latent_channels: int | None = None, scale_factor: int | None = None) -> Any:
    """An ``AutoencoderTiny`` from a local folder, checked against the model it will preview.

    ``latent_channels`` and ``scale_factor`` (the VAE's image-to-latent size ratio), when given, must match
    the decoder's: a TAESD (4 channels, 8x) cannot preview an SD3 model (16 channels).
    """
    from diffusers import AutoencoderTiny

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"tiny_decoder: {str(folder)!r} is not an AutoencoderTiny folder (no config.json); pass a local "
            f"TAESD-style folder, or train one into the model folder's {PREVIEW_DECODER_DIR}/"
        )
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") != "AutoencoderTiny":
        raise ValueError(
            f"tiny_decoder: {str(folder)!r} holds a {config.get('_class_name')!r}, not an AutoencoderTiny"
        )
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"tiny_decoder: {str(folder)!r} has no .safetensors weights")
    channels = config.get("latent_channels", 4)
    factor = config.get("upsampling_scaling_factor", 2) ** (len(config.get("decoder_block_out_channels", (0,) * 4)) - 1)
    if latent_channels is not None and channels != latent_channels:
        raise ValueError(
            f"tiny_decoder: {str(folder)!r} decodes {channels}-channel latents but this model's latents have "
            f"{latent_channels} channels"
        )
    if scale_factor is not None and factor != scale_factor:
        raise ValueError(
            f"tiny_decoder: {str(folder)!r} upsamples latents {factor}x but this model's VAE is {scale_factor}x"
        )
    # AutoencoderTiny stores a `block_out_channels` key that its own __init__ does not take, so every load of a
    # TAESD folder warns about it; that warning says nothing about the user's folder.
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        decoder = AutoencoderTiny.from_pretrained(folder).eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)
    # Channels-last lets torch's oneDNN convolutions take the small 3x3 convs too: on the CPU a shapes preview
    # costs about 0.9 ms instead of 1.5 ms (benchmarks/bench_preview.py). tiny_decode follows the layout.
    return decoder.to(memory_format=torch.channels_last)


@torch.no_grad()
def tiny_decode(decoder: Any, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents as the sampler sees them -> (B, 3, H, W) RGB in [-1, 1], with a tiny decoder."""
    cfg = decoder.config
    first_conv = next(getattr(decoder, "decoder", decoder).parameters())  # its device, dtype and memory layout
    x = latents.to(first_conv.device, first_conv.dtype) / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    if first_conv.dim() == 4 and first_conv.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return decoder.decode(x, return_dict=False)[0].float().clamp(-1, 1)


@torch.no_grad()
def fit_latent_rgb(vae: Any, images: torch.Tensor, name: str = "fitted", batch: int = 64) -> LatentRGBTable:
    """Least-squares fit of factors and bias: encode ``images`` (N, 3, H, W in [-1, 1]), decode the
    latents with the full VAE, and regress the decoded pixels (pooled to latent resolution) on the
    latents as the sampler sees them (scaled, and shifted where the VAE has a shift factor)."""
    from .vae import decode_latents, encode_images

    xs, ys = [], []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(vae.device, vae.dtype)
        latents = encode_images(vae, x, sample=False)  # scaled as the sampler sees them (shift, statistics)
        decoded = decode_latents(vae, latents).float()
        latents = latents.float()
        pooled = F.adaptive_avg_pool2d(decoded, latents.shape[-2:])
        xs.append(latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]))
        ys.append(pooled.permute(0, 2, 3, 1).reshape(-1, 3))
    x = torch.cat(xs).double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, torch.cat(ys).double()).solution  # (C + 1, 3)
    factors = tuple(tuple(float(v) for v in row) for row in solution[:-1])
    bias = tuple(float(v) for v in solution[-1])
    return LatentRGBTable(name=name, factors=factors, bias=bias, source=f"least-squares fit on {len(images)} images",
                          scaling_factor=float(vae.config.scaling_factor))


@torch.no_grad()
def preview_psnr(vae: Any, table: LatentRGBTable, latents: torch.Tensor) -> float:
    """PSNR (dB) of the linear preview against the full VAE decode of the same latents, at latent resolution."""
    from .vae import decode_latents

    decoded = decode_latents(vae, latents.to(vae.device, vae.dtype)).float().clamp(-1, 1)
    target = F.adaptive_avg_pool2d(decoded, latents.shape[-2:])
    pred = table.to_rgb(latents).clamp(-1, 1)
    mse = F.mse_loss(pred, target.to(pred.device)).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def contact_sheet(frames: Sequence[tuple[int, Image.Image]], columns: int = 8, scale: int = 1) -> Image.Image:
    """A grid of frames with the step number under each."""
    if not frames:
        raise ValueError("contact_sheet needs at least one frame")
    w, h = frames[0][1].size
    w, h = w * scale, h * scale
    label = 12
    cols = min(columns, len(frames))
    rows = math.ceil(len(frames) / cols)
    sheet = Image.new("RGB", (cols * w, rows * (h + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (step, image) in enumerate(frames):
        x, y = (k % cols) * w, (k // cols) * (h + label)
        sheet.paste(image.resize((w, h), Image.Resampling.NEAREST), (x, y))
        draw.text((x + 2, y + h), f"{step}", fill="black")
    return sheet


def _save_image_atomic(image: Image.Image, path: Path, **kwargs: Any) -> None:
    fmt = {".gif": "GIF", **IMAGE_FORMATS}.get(path.suffix.lower(), "PNG")  # a .jpg contact sheet is a JPEG
    atomic_write(path, lambda f: image.save(f, format=fmt, **kwargs))


def _check_output_file(name: str, path: Path | None, suffixes: tuple[str, ...]) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{name} must end in one of {suffixes}, got {str(path)!r}")
    check_writable_dir(path.parent.resolve(), name)
    return path


class PreviewCallback:
    """Previews every ``every`` steps (and the last): PNG files, an animation, a contact sheet, a UI hook.

    ``source="denoised"`` (default) previews the x0 estimate, which is a clean picture early on;
    ``"latents"`` previews the noisy latents, as the seed document does. ``method="linear"`` uses a
    latent-to-RGB table (cheapest, blotchy); ``"tiny"`` a tiny distilled decoder (``tiny_decoder``: a
    local AutoencoderTiny folder or model; default: the model folder's ``preview_decoder/``), close to
    the final picture at a small cost; ``"vae"`` decodes with the pipeline's VAE (exact, slower);
    ``"auto"`` is tiny when a decoder is given or the model folder has one, else linear. Previews
    only observe: the callback never changes the run.
    """

    def __init__(
        self,
        folder: str | Path | None = None,
        every: int = 1,
        source: str = "denoised",
        method: str = "linear",
        animation: str | Path | None = None,
        contact_sheet: str | Path | None = None,
        on_image: Callable[[Image.Image, int, torch.Tensor], None] | None = None,
        table: LatentRGBTable | None = None,
        batch_index: int = 0,
        min_interval: float = 0.0,
        frame_size: int | None = None,
        tiny_decoder: str | Path | Any | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if source not in _SOURCES:
            raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if not (isinstance(min_interval, (int, float)) and min_interval >= 0):
            raise ValueError(f"min_interval must be a number of seconds >= 0, got {min_interval!r}")
        if isinstance(batch_index, bool) or not isinstance(batch_index, int) or batch_index < 0:
            raise ValueError(f"batch_index must be an int >= 0, got {batch_index!r}")
        if tiny_decoder is not None and method not in ("tiny", "auto"):
            raise ValueError(f"tiny_decoder is only used with method='tiny' or 'auto', got method={method!r}")
        if isinstance(tiny_decoder, (str, Path)) and not (Path(tiny_decoder) / "config.json").is_file():
            raise FileNotFoundError(f"tiny_decoder: {str(tiny_decoder)!r} is not an AutoencoderTiny folder (no config.json)")
        if folder is not None:
            folder = Path(folder)
            if folder.exists() and not folder.is_dir():
                raise NotADirectoryError(f"preview folder {str(folder)!r} exists and is not a folder")
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise PermissionError(f"preview folder {str(folder)!r} is not writable")
        self.folder = folder
        self.every, self.source, self.method = every, source, method
        self.animation = _check_output_file("animation", animation, (".gif", ".webp"))
        self.contact_sheet = _check_output_file("contact_sheet", contact_sheet, (".png", ".jpg", ".jpeg", ".webp"))
        self.on_image, self.table, self.batch_index = on_image, table, batch_index
        self.min_interval, self.frame_size = float(min_interval), frame_size
        self.frames: list[tuple[int, Image.Image]] = []
        self.seconds = 0.0  # time spent making previews, for benchmarks
        self._last = -math.inf
        self._table: LatentRGBTable | None = None
        self.tiny_decoder = tiny_decoder
        self._tiny: Any = None
        self._tiny_source: Any = None  # what _tiny was loaded from, so a second run reuses it
        self.resolved_method: str | None = None  # "auto" resolved for the current run

    @property
    def tensor_inputs(self) -> list[str]:
        return [self.source]

    def on_run_start(self, pipeline: Any) -> None:
        """Check the table against this model before generation starts."""
        self.frames, self.seconds, self._last = [], 0.0, -math.inf
        method = self.method
        if method in ("tiny", "auto"):
            source = self.tiny_decoder if self.tiny_decoder is not None else tiny_decoder_folder(pipeline)
            if source is None and method == "tiny":
                folder = getattr(getattr(pipeline, "config", None), "_name_or_path", None)
                raise FileNotFoundError(
                    f"method='tiny': the model folder {folder!r} has no {PREVIEW_DECODER_DIR}/ and no tiny_decoder was "
                    "given; pass tiny_decoder=FOLDER (an AutoencoderTiny / TAESD folder) or use method='auto'"
                )
            method = "linear" if source is None else "tiny"
            if source is not None:
                self._load_tiny(pipeline, source)
        self.resolved_method = method
        if method == "linear":
            table = self.table if self.table is not None else table_for(pipeline)
            channels = pipeline.latent_channels()
            if table.channels != channels:
                raise ValueError(
                    f"latent-to-RGB table {table.name!r} has {table.channels} channels but this model's latents "
                    f"have {channels}; fit one with `stepdiff fit-preview MODEL_DIR`"
                )
            self._table = table

    def _load_tiny(self, pipeline: Any, source: Any) -> None:
        channels, factor = pipeline.latent_channels(), pipeline.vae_scale_factor
        if self._tiny is not None and self._tiny_source is source:
            return
        if isinstance(source, (str, Path)):
            self._tiny = load_tiny_decoder(source, channels, factor)
            device = getattr(pipeline, "device", None)
            if isinstance(device, torch.device) and device.type != "cpu":  # decode where the latents are
                self._tiny.to(device)
        else:  # an AutoencoderTiny already loaded
            cfg = source.config
            if cfg.latent_channels != channels:
                raise ValueError(
                    f"tiny_decoder decodes {cfg.latent_channels}-channel latents but this model's latents have {channels}"
                )
            self._tiny = source.eval()
        self._tiny_source = source

    def _render(self, pipeline: Any, latents: torch.Tensor) -> Image.Image:
        if self.resolved_method == "tiny":
            image = rgb_to_image(tiny_decode(self._tiny, latents[None])[0])
        elif self.method == "vae":
            from .vae import decode_latents

            image = decode_latents(pipeline.vae, latents[None])[0].float()
            image = rgb_to_image(image)
        else:
            image = self._table.to_image(latents)
        if self.frame_size is not None:
            image = image.resize((self.frame_size, self.frame_size), Image.Resampling.NEAREST)
        return image

    def __call__(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> None:
        last = step_index == pipeline.num_timesteps - 1
        if step_index % self.every and not last:
            return None
        started = time.perf_counter()
        if not last and started - self._last < self.min_interval:
            return None
        self._last = started
        tensor = callback_kwargs[self.source]
        index = min(self.batch_index, tensor.shape[0] - 1)
        image = self._render(pipeline, tensor[index])
        self.frames.append((step_index, image))
        if self.folder is not None:
            _save_image_atomic(image, self.folder / f"{step_index}.png")
        if self.on_image is not None:
            self.on_image(image, step_index, timestep)
        self.seconds += time.perf_counter() - started
        return None  # previews only observe

    def on_run_end(self, pipeline: Any) -> None:
        """Write the animation and contact sheet (also after an interrupted run)."""
        if not self.frames:
            return
        if self.animation is not None:
            first, *rest = [image for _, image in self.frames]
            _save_image_atomic(first, self.animation, save_all=True, append_images=rest, duration=120, loop=0)
        if self.contact_sheet is not None:
            _save_image_atomic(contact_sheet(self.frames), self.contact_sheet)


def images_to_tensor(images: Sequence[Image.Image] | np.ndarray) -> torch.Tensor:
    """PIL images or a uint8 (N, H, W, 3) array -> (N, 3, H, W) float in [-1, 1]."""
    array = np.stack([np.asarray(i.convert("RGB")) for i in images]) if not isinstance(images, np.ndarray) else images
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
