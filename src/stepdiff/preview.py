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

``method="auto"`` (the default) is the tiny decoder when the model folder ships one (or one is given), at a
cadence chosen from the run's own measurements so that previews take at most ``PREVIEW_SHARE`` (3%) of the
run (``PreviewBudget``), and the linear table otherwise.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import threading
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
    "PREVIEW_SHARE",
    "LatentRGBTable",
    "PreviewBudget",
    "PreviewCallback",
    "builtin_tables",
    "contact_sheet",
    "fit_latent_rgb",
    "load_tiny_decoder",
    "preview_psnr",
    "steady_cadence",
    "table_for",
    "tiny_decode",
    "tiny_decoder_folder",
]

FITTED_TABLE_FILE = "latent_rgb.json"
PREVIEW_DECODER_DIR = "preview_decoder"
_SOURCES = ("denoised", "latents")
_METHODS = ("linear", "vae", "tiny", "auto")
PREVIEW_SHARE = 0.03  # the most of a run's time that method="auto" lets the tiny decoder's previews take
_RECENT = 9  # the estimates are means of the latest step and frame times, so they follow the run


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


def frame_latents(pipeline: Any, tensor: torch.Tensor, index: int = 0) -> torch.Tensor:
    """Row ``index`` (the last row when the batch is smaller) of a step's latents or x0 estimate, spatial:
    (C, h, w). Flux's packed tokens are unpacked (``pipeline.spatial_latents``)."""
    spatial = getattr(pipeline, "spatial_latents", None)
    if spatial is not None:
        tensor = spatial(tensor)
    return tensor[min(index, tensor.shape[0] - 1)]


@torch.no_grad()
def render_frame(pipeline: Any, latents: torch.Tensor, method: str, *, table: LatentRGBTable | None = None,
                 tiny: Any = None) -> Image.Image:
    """The one frame renderer of the preview callback and the studio: (C, h, w) latents as the sampler sees them
    -> a picture. ``method``: "tiny" (``tiny``, an AutoencoderTiny), "vae" (the pipeline's VAE, exact) or "linear"
    (``table``). The latents go to the decoder's device and dtype; the picture is made in float32."""
    if method == "tiny":
        return rgb_to_image(tiny_decode(tiny, latents[None])[0])
    if method == "vae":
        from .vae import decode_latents

        vae = pipeline.vae
        return rgb_to_image(decode_latents(vae, latents[None].to(vae.device, vae.dtype))[0].float())
    if method == "linear":
        return table.to_image(latents)
    raise ValueError(f"method must be one of tiny, vae, linear, got {method!r}")


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


def _every(n: int) -> str:
    """1 -> "every step", 2 -> "every 2nd step", 11 -> "every 11th step", 21 -> "every 21st step"."""
    if n == 1:
        return "every step"
    suffix = "th" if 10 < n % 100 < 14 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"every {n}{suffix} step"


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


def steady_cadence(frame_seconds: float, step_seconds: float, share: float = PREVIEW_SHARE) -> int:
    """The smallest ``k`` with ``frame / (k * step + frame) <= share``: a frame every ``k`` steps of a long run
    then takes at most ``share`` of it (about ``frame / (share * step)``)."""
    if frame_seconds <= 0:
        return 1
    if step_seconds <= 0:
        return 1 << 30
    return max(1, math.ceil(frame_seconds * (1 - share) / (share * step_seconds) - 1e-9))


class PreviewBudget:
    """Which steps of one run get a preview frame, so that previews take at most ``share`` of the run's time.

    The rule works from the run's own measurements. The first step always gets a frame (it measures what a
    frame costs), the last step too (the final preview). At every other step, with ``d`` the mean cost of
    the run's latest 9 frames and ``s`` the mean time of its latest 9 steps without previews (the first frame
    and the first step, which carry one-time costs, count only until there are others), the cadence ``k`` is
    the smallest number of steps between frames for which the projected share of the whole run stays within
    ``share``::

        (spent + F(k) * d) / (steps_so_far + steps_left * s + spent + F(k) * d) <= share

    where ``spent`` is the preview time so far and ``F(k)`` the frames still to come: one every ``k`` steps
    after the latest frame, and the last step's; and that is no smaller than the steady cadence, the smallest
    ``k`` with ``d / (k * s + d) <= share`` (about ``d / (share * s)``), so that time left over early is not
    spent in a burst of frames at the end. A step gets a frame when ``k`` steps have passed since the
    latest one. ``k`` is chosen again at every step, so it follows the run (a slow first frame spreads the
    next ones out; a faster step than expected brings them closer). Only the first and last frames can take
    the share over ``share``: a run too short to pay for them still gets them.

    Frames may be made on another thread (the studio): ``wants`` promises a frame, ``frame_done`` reports
    its cost later (``frame_skipped`` when it was never made). Until the first cost is known, no frame but
    the last is promised; a promised frame whose cost is not in yet counts as ``d``.
    """

    def __init__(self, share: float = PREVIEW_SHARE) -> None:
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(f"share must be a number in (0, 1], got {share!r}")
        self.share = float(share)
        self.step_seconds: list[float] = []  # each step's time without preview work
        self.frame_seconds: list[float] = []  # each frame's cost
        self.frame_steps: list[int] = []  # the steps that got (were promised) a frame
        self.cadence: int | None = None  # the latest chosen k (None before the second step)
        self.spent = 0.0  # preview seconds so far
        self.elapsed = 0.0  # step seconds so far, without previews
        self._pending = 0  # promised frames whose cost is not in yet
        self._lock = threading.Lock()

    def step_done(self, seconds: float) -> None:
        """A step's time without preview work."""
        with self._lock:
            self.step_seconds.append(max(float(seconds), 0.0))
            self.elapsed += max(float(seconds), 0.0)

    def spend(self, seconds: float) -> None:
        """Preview time that is no frame (deciding, handing over): counted in the share, not in ``d``."""
        with self._lock:
            self.spent += max(float(seconds), 0.0)

    def frame_done(self, seconds: float) -> None:
        """The cost of a promised frame."""
        with self._lock:
            self._pending = max(self._pending - 1, 0)
            self.frame_seconds.append(max(float(seconds), 0.0))
            self.spent += max(float(seconds), 0.0)

    def frame_skipped(self, step_index: int) -> None:
        """The promised frame of ``step_index`` was not made after all (nobody watched, a newer one replaced it)."""
        with self._lock:
            self._pending = max(self._pending - 1, 0)
            if step_index in self.frame_steps:
                self.frame_steps.remove(step_index)

    @staticmethod
    def _estimate(samples: list[float]) -> float:
        # The mean, not the median: the budget is a sum, and on a busy machine a frame or a step now and then
        # takes many times its usual time. The first sample carries one-time costs (the run's setup).
        warm = samples[1:] or samples
        return statistics.fmean(warm[-_RECENT:])

    def projected_share(self, k: int, step_index: int, total_steps: int) -> float:
        """The share of the whole run that previews would take with cadence ``k`` from ``step_index`` on."""
        d = self._estimate(self.frame_seconds)
        s = self._estimate(self.step_seconds) if self.step_seconds else 0.0
        nxt = max(self.frame_steps[-1] + k, step_index)
        frames = len(range(nxt, total_steps - 1, k)) + 1  # the cadence's, then the last step's
        preview = self.spent + (self._pending + frames) * d
        run = self.elapsed + (total_steps - 1 - step_index) * s + preview
        return preview / run if run > 0 else 0.0

    def steady_cadence(self) -> int:
        """``steady_cadence`` of this run's estimates of a frame's and a step's time."""
        s = self._estimate(self.step_seconds) if self.step_seconds else 0.0
        return steady_cadence(self._estimate(self.frame_seconds), s, self.share)

    def choose(self, step_index: int, total_steps: int) -> int:
        """The smallest cadence whose projected share is within ``share`` (``total_steps`` if none is), and no
        smaller than the steady cadence (so time left over early is not spent in a burst of frames at the end)."""
        lo, hi = min(self.steady_cadence(), max(total_steps, 1)), max(total_steps, 1)
        if self.projected_share(hi, step_index, total_steps) > self.share:
            return hi
        while lo < hi:  # the projected share falls as k grows
            mid = (lo + hi) // 2
            if self.projected_share(mid, step_index, total_steps) <= self.share:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def wants(self, step_index: int, total_steps: int) -> bool:
        """Whether step ``step_index`` (of ``total_steps``) gets a frame; a yes is a promise (see ``frame_done``)."""
        with self._lock:
            if step_index >= total_steps - 1 or not self.frame_steps:
                take = True
            elif not self.frame_seconds:  # the first frame's cost is not in yet
                take = False
            else:
                self.cadence = self.choose(step_index, total_steps)
                take = self.frame_steps[-1] + self.cadence <= step_index
            if take:
                self.frame_steps.append(step_index)
                self._pending += 1
            return take

    @property
    def measured_share(self) -> float:
        """Preview time over the run's time so far (steps and previews)."""
        total = self.elapsed + self.spent
        return self.spent / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"share": self.share, "cadence": self.cadence, "frame_steps": list(self.frame_steps),
                "measured_share": round(self.measured_share, 5),
                "frame_seconds": round(self._estimate(self.frame_seconds), 6) if self.frame_seconds else None,
                "step_seconds": round(self._estimate(self.step_seconds), 6) if self.step_seconds else None}


class PreviewCallback:
    """Previews of the steps (and always of the last): PNG files, an animation, a contact sheet, a UI hook.

    ``source="denoised"`` (default) previews the x0 estimate, which is a clean picture early on;
    ``"latents"`` previews the noisy latents, as the seed document does. ``method="linear"`` uses a
    latent-to-RGB table (cheapest, blotchy); ``"tiny"`` a tiny distilled decoder (``tiny_decoder``: a
    local AutoencoderTiny folder or model; default: the model folder's ``preview_decoder/``), close to
    the final picture at a small cost; ``"vae"`` decodes with the pipeline's VAE (exact, slower);
    ``"auto"`` (default) is tiny when a decoder is given or the model folder has one, else linear.

    ``every=N`` previews every N-th step and the last, whatever the method. Left out (``None``), it is
    every step, except for ``"auto"`` with a tiny decoder: then the steps are chosen as the run goes,
    from its own measured step and frame times, so that previews take at most 3% of the run
    (``PreviewBudget``; the first and the last step always get a frame; steps between frames get none,
    not a linear one). ``method``/``resolved_method``, ``cadence``, ``frame_steps`` and ``describe()``
    say what a run got. Previews only observe: the callback never changes the run.
    """

    def __init__(
        self,
        folder: str | Path | None = None,
        every: int | None = None,
        source: str = "denoised",
        method: str = "auto",
        animation: str | Path | None = None,
        contact_sheet: str | Path | None = None,
        on_image: Callable[[Image.Image, int, torch.Tensor], None] | None = None,
        table: LatentRGBTable | None = None,
        batch_index: int = 0,
        min_interval: float = 0.0,
        frame_size: int | None = None,
        tiny_decoder: str | Path | Any | None = None,
    ) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be an int >= 1, got {every!r} (or None: every step; with method='auto', "
                             "chosen from the run's measured cost)")
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
        self._warm: set[tuple] = set()  # (decoder, latent shape, dtype) already decoded once
        self.resolved_method: str | None = None  # "auto" resolved for the current run
        self.budget: PreviewBudget | None = None  # the latest run's, when "auto" chose the steps

    @property
    def tensor_inputs(self) -> list[str]:
        return [self.source]

    def on_run_start(self, pipeline: Any) -> None:
        """Check the table against this model before generation starts."""
        self.frames, self.seconds, self._last = [], 0.0, -math.inf
        self._start_budget(pipeline)
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
        if method == "tiny" and self.method == "auto" and self.every is None:
            self.budget = self._run_state(pipeline)["budget"] = PreviewBudget()

    def _run_state(self, pipeline: Any) -> dict:
        from .callbacks import _per_run

        return _per_run(pipeline, self)

    def _start_budget(self, pipeline: Any) -> None:
        """Per-run state: the budget (set once the method is known) and when the latest step began."""
        self.budget = None
        self._run_state(pipeline).update(budget=None, mark=time.perf_counter())

    @property
    def cadence(self) -> int | None:
        """Steps between frames: ``every``, or the latest run's chosen cadence (None before it chose one)."""
        if self.every is not None or self.budget is None:
            return self.every or 1
        return self.budget.cadence

    @property
    def frame_steps(self) -> list[int]:
        return [step for step, _ in self.frames]

    def describe(self, total_steps: int | None = None) -> str:
        """What the latest run got, in words: method, frames, cadence (e.g. for a CLI line)."""
        method = self.resolved_method or self.method
        name = {"tiny": "tiny decoder", "linear": "linear table", "vae": "VAE"}.get(method, method)
        of = f" of {total_steps}" if total_steps is not None else ""
        text = f"{name}, {len(self.frames)}{of} steps"
        if self.budget is not None:
            steps = self.frame_steps
            gaps = [b - a for a, b in itertools.pairwise(steps[:-1])]  # the cadence's, not the gap to the last step
            cadence = f"{_every(round(statistics.median(gaps)))}, " if gaps else ""
            text += (f" ({cadence}chosen from this run's step and frame times so that previews take <= "
                     f"{self.budget.share:.0%} of it; measured {self.budget.measured_share:.1%})")
        elif (self.every or 1) > 1:
            text += f" ({_every(self.every)})"
        return text

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
        image = render_frame(pipeline, latents, self.resolved_method or self.method, table=self._table, tiny=self._tiny)
        if self.frame_size is not None:
            image = image.resize((self.frame_size, self.frame_size), Image.Resampling.NEAREST)
        return image

    def __call__(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> None:
        started = time.perf_counter()
        total = pipeline.num_timesteps
        last = step_index == total - 1
        state = self._run_state(pipeline)
        budget = state.get("budget")
        if budget is not None:
            budget.step_done(started - state.get("mark", started))
            wanted = budget.wants(step_index, total)
        else:
            wanted = last or step_index % (self.every or 1) == 0
        if wanted and not last and started - self._last < self.min_interval:
            wanted = False
            if budget is not None:
                budget.frame_skipped(step_index)
        frame_seconds = 0.0
        if wanted:
            self._last = started
            latents = frame_latents(pipeline, callback_kwargs[self.source], self.batch_index)
            if budget is not None:
                self._warm_up(latents, budget)
            begun = time.perf_counter()
            image = self._render(pipeline, latents)
            self.frames.append((step_index, image))
            if self.folder is not None:
                _save_image_atomic(image, self.folder / f"{step_index}.png")
            if self.on_image is not None:
                self.on_image(image, step_index, timestep)
            frame_seconds = time.perf_counter() - begun
        ended = time.perf_counter()
        if wanted or budget is not None:
            self.seconds += ended - started
        if budget is not None:
            if wanted:
                budget.frame_done(frame_seconds)
            budget.spend(ended - started - frame_seconds)  # deciding, and a first decode's warm-up
        state["mark"] = ended
        return None  # previews only observe

    def _warm_up(self, latents: torch.Tensor, budget: PreviewBudget) -> None:
        """A decoder's first call at a latent size carries one-time costs (memory, kernel choice) up to ~7x a
        frame's: one untimed-as-a-frame decode first, so the budget's first measured frame is a typical one.
        The warm-up counts in the share (``spend``), once per decoder and size."""
        key = (id(self._tiny), tuple(latents.shape), latents.dtype)
        if self.resolved_method != "tiny" or key in self._warm:
            return
        tiny_decode(self._tiny, latents[None])
        self._warm.add(key)

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
