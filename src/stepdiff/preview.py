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
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .frames import (  # noqa: F401  (re-exported: their public home was this module)
    FITTED_TABLE_FILE,
    PREVIEW_DECODER_DIR,
    PREVIEW_SHARE,
    LatentRGBTable,
    PreviewBudget,
    builtin_tables,
    fit_latent_rgb,
    frame_latents,
    load_tiny_decoder,
    preview_psnr,
    render_frame,
    rgb_to_image,
    steady_cadence,
    table_for,
    tiny_decode,
    tiny_decoder_folder,
)
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

_SOURCES = ("denoised", "latents")
_METHODS = ("linear", "vae", "tiny", "auto")


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
        from .callbacks.base import _per_run

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


def images_to_tensor(images: Sequence[Image.Image] | np.ndarray) -> torch.Tensor:
    """PIL images or a uint8 (N, H, W, 3) array -> (N, 3, H, W) float in [-1, 1]."""
    array = np.stack([np.asarray(i.convert("RGB")) for i in images]) if not isinstance(images, np.ndarray) else images
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
