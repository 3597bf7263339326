"""Latents to pictures without the full pipeline: built-in linear tables (rgb in [-1, 1] = latents @ factors + bias,
latents as the sampler sees them; numbers from the sources named in ``data/latent_rgb_factors.json``), tables fitted
by least squares (``fit_latent_rgb``, stored as ``latent_rgb.json`` in the model folder, where ``table_for`` finds
it first), tiny decoders (``AutoencoderTiny``: the folder's ``preview_decoder/`` or any TAESD-style folder), and the
one frame renderer (``render_frame``) the preview callback and the studio share, and how often to draw a frame
(``PreviewBudget``: at most ``PREVIEW_SHARE`` of a run). Re-exported by
:mod:`stepdiff.preview`."""

from __future__ import annotations

import json
import math
import statistics
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .images import atomic_write

__all__ = [
    "FITTED_TABLE_FILE",
    "PREVIEW_DECODER_DIR",
    "PREVIEW_SHARE",
    "LatentRGBTable",
    "PreviewBudget",
    "builtin_tables",
    "fit_latent_rgb",
    "frame_latents",
    "load_tiny_decoder",
    "preview_psnr",
    "render_frame",
    "rgb_to_image",
    "steady_cadence",
    "table_for",
    "tiny_decode",
    "tiny_decoder_folder",
]

FITTED_TABLE_FILE = "latent_rgb.json"
PREVIEW_DECODER_DIR = "preview_decoder"
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
