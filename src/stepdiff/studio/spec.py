"""What a studio job asks for, checked field by field before any model work.

``parse_job(body, limits)`` turns a submitted JSON object into a ``JobSpec`` or raises ``FieldError``
naming the field, the bad value and what is allowed. The HTTP layer turns that into a 422 JSON error.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

from ..request import FieldError
from ..schedulers import scheduler_class, scheduler_names

__all__ = ["MAX_PROMPT_CHARS", "FieldError", "JobSpec", "Limits", "PreviewSpec", "parse_job"]

MAX_PROMPT_CHARS = 2000  # far more than any text encoder reads (77 tokens); keeps requests and the database small
MAX_GUIDANCE = 100.0  # as the CLI: beyond this the guided prediction saturates
MAX_SEED = 2**64 - 1
_SOURCES = ("denoised", "latents")
_METHODS = ("auto", "tiny", "linear", "vae")


def _is_unicode(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: JSON allows a lone surrogate escape (\\ud800) that no file,
    database row or response body can hold as text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Limits:
    """What this server accepts: from the loaded model (sizes) and the server's flags."""

    native_size: int = 64
    size_multiple: int = 8
    min_size: int = 8
    max_size: int = 512
    max_steps: int = 500
    default_steps: int = 25
    default_guidance: float = 7.5
    models: tuple[str, ...] = ()  # the model names a job may ask for (serve --models); () : the one model
    loras: tuple[str, ...] = ()  # the LoRA names a job may ask for (serve --loras)


@dataclass
class PreviewSpec:
    # A frame every N steps (and the last); None: every step, or with the tiny decoder of "auto", the steps
    # chosen from the job's measured step and frame times so that frames take at most 3% of it (PreviewBudget).
    every: int | None = None
    source: str = "denoised"  # the x0 estimate, or the noisy latents
    # "auto": the model's tiny decoder where it ships one, at that chosen cadence (at every step it cost +18% on
    # the 2-core machine, bench_studio.py), else the linear table.
    method: str = "auto"


@dataclass
class JobSpec:
    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int = 25
    width: int = 64
    height: int = 64
    guidance: float = 7.5
    scheduler: str | None = None  # an alias or diffusers class name; None: the model's own
    cfg_cutoff: float | None = None  # guidance off after this fraction of the steps
    guidance_interval: tuple[float, float] | None = None  # guidance only in [start, end) (ratios of the steps)
    cache: str | None = None  # step caching policies (stepdiff.caching.parse_cache_spec), normalized
    fast: bool = False  # the fast preset (stepdiff.caching.fast_preset); not with cache
    preview: PreviewSpec = field(default_factory=PreviewSpec)
    # pictures (upload ids) and what goes with them, as the CLI flags (studio/fields.py checks them)
    init_image: str | None = None
    strength: float | None = None  # with init_image: 0.6, with mask 1.0
    mask: str | None = None
    control: str | None = None
    control_scale: float | None = None  # with control: 1.0
    control_end: float | None = None  # with control: 1.0
    num_images: int = 1
    model: str | None = None  # serve --models: the folder's name; None: the default model
    loras: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "scale"}]

    @property
    def kind(self) -> str:
        """The kind of run: text2image, image2image or inpaint (a ControlNet rides on any of them)."""
        if self.init_image is None:
            return "text2image"
        return "image2image" if self.mask is None else "inpaint"

    @property
    def run_steps(self) -> int:
        """Denoising steps that run: image to image runs int(steps * strength) of them, as the classic pipelines."""
        if self.init_image is None or self.strength is None:
            return self.steps
        return max(1, min(self.steps, int(self.steps * self.strength)))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.guidance_interval is not None:
            data["guidance_interval"] = list(self.guidance_interval)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """From what ``to_dict`` stored (trusted: the database)."""
        data = dict(data)
        data["preview"] = PreviewSpec(**data.get("preview") or {})
        if data.get("guidance_interval") is not None:
            data["guidance_interval"] = tuple(data["guidance_interval"])
        return cls(**data)


_FIELDS = {"prompt", "negative_prompt", "seed", "steps", "width", "height", "size", "guidance", "scheduler",
           "cfg_cutoff", "guidance_interval", "cache", "fast", "preview", "init_image", "strength", "mask", "control",
           "control_scale", "control_end", "num_images", "model", "loras"}
_PREVIEW_FIELDS = {"every", "source", "method"}


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise FieldError(name, value, f"an integer in [{low}, {high}]")
    return int(value)


def _number(name: str, value: Any, low: float, high: float) -> float:
    bad = FieldError(name, value, f"a number in [{low:g}, {high:g}]")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise bad
    try:
        number = float(value)  # an integer such as 10**400 has no float: OverflowError
    except (OverflowError, ValueError):
        raise bad from None
    if not math.isfinite(number) or not low <= number <= high:
        raise bad
    return number


def _text(name: str, value: Any, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise FieldError(name, value, f"a string of at most {MAX_PROMPT_CHARS} characters")
    if required and not value.strip():
        raise FieldError(name, value, "a non-empty string")
    if len(value) > MAX_PROMPT_CHARS:
        raise FieldError(name, f"<{len(value)} characters>", f"a string of at most {MAX_PROMPT_CHARS} characters")
    if "\x00" in value:
        raise FieldError(name, value, "text without NUL characters")
    if not _is_unicode(value):
        raise FieldError(name, value, "valid Unicode text (no lone surrogate such as \\ud800)")
    return value


def _side(name: str, value: Any, limits: Limits) -> int:
    allowed = (f"a multiple of {limits.size_multiple} in [{limits.min_size}, {limits.max_size}]")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value % limits.size_multiple \
            or not limits.min_size <= value <= limits.max_size:
        raise FieldError(name, value, allowed)
    return int(value)


def _unknown(where: str, data: dict, known: set[str]) -> None:
    extra = sorted(set(data) - known)
    if extra:
        name = f"{where}{extra[0]}"
        names = ", ".join(sorted(known))
        raise FieldError(name, data[extra[0]], f"one of the known fields: {names}",
                         f"unknown field {name!r}; the known fields are {names}")


def parse_job(body: Any, limits: Limits) -> JobSpec:
    """A ``JobSpec`` from a submitted JSON object, every field checked; defaults for those left out."""
    if not isinstance(body, dict):
        raise FieldError("body", body, "a JSON object")
    _unknown("", body, _FIELDS)
    spec = JobSpec(prompt=_text("prompt", body.get("prompt"), required=True))
    spec.negative_prompt = _text("negative_prompt", body.get("negative_prompt"), required=False) or None
    if body.get("seed") is not None:
        spec.seed = _int("seed", body["seed"], 0, MAX_SEED)
    spec.steps = limits.default_steps if body.get("steps") is None else _int("steps", body["steps"], 1, limits.max_steps)
    spec.width = spec.height = limits.native_size
    if body.get("size") is not None:
        if "width" in body or "height" in body:
            raise FieldError("size", body["size"], "left out when width and height are given")
        size = body["size"]
        try:
            w, h = (int(v) for v in str(size).lower().split("x"))
        except ValueError:
            raise FieldError("size", size, "WIDTHxHEIGHT, e.g. 64x64") from None
        spec.width, spec.height = _side("size width", w, limits), _side("size height", h, limits)
    if body.get("width") is not None:
        spec.width = _side("width", body["width"], limits)
    if body.get("height") is not None:
        spec.height = _side("height", body["height"], limits)
    spec.guidance = limits.default_guidance if body.get("guidance") is None else \
        _number("guidance", body["guidance"], 0.0, MAX_GUIDANCE)
    if body.get("scheduler") is not None:
        name = body["scheduler"]
        allowed = f"one of: {', '.join(scheduler_names())}"
        if not isinstance(name, str):
            raise FieldError("scheduler", name, allowed)
        try:
            scheduler_class(name)
        except ValueError:
            raise FieldError("scheduler", name, allowed) from None
        spec.scheduler = name
    if body.get("cfg_cutoff") is not None:
        spec.cfg_cutoff = _number("cfg_cutoff", body["cfg_cutoff"], 0.0, 1.0)
    if body.get("guidance_interval") is not None:
        if spec.cfg_cutoff is not None:
            raise FieldError("guidance_interval", body["guidance_interval"], "left out when cfg_cutoff is given")
        spec.guidance_interval = _interval(body["guidance_interval"])
    if body.get("fast") is not None:
        if not isinstance(body["fast"], bool):
            raise FieldError("fast", body["fast"], "true or false")
        spec.fast = body["fast"]
    if body.get("cache") is not None:
        if spec.fast:
            raise FieldError("cache", body["cache"], "left out when fast is true (fast is a cache preset)")
        spec.cache = _cache(body["cache"], spec.steps)
    preview = body.get("preview")
    if preview is not None:
        if not isinstance(preview, dict):
            raise FieldError("preview", preview, "an object with every, source, method")
        _unknown("preview.", preview, _PREVIEW_FIELDS)
        p = spec.preview
        if preview.get("every") is not None:
            p.every = _int("preview.every", preview["every"], 1, limits.max_steps)
        if preview.get("source") is not None:
            if preview["source"] not in _SOURCES:
                raise FieldError("preview.source", preview["source"], f"one of {', '.join(_SOURCES)}")
            p.source = preview["source"]
        if preview.get("method") is not None:
            if preview["method"] not in _METHODS:
                raise FieldError("preview.method", preview["method"], f"one of {', '.join(_METHODS)}")
            p.method = preview["method"]
    from .fields import parse_inputs

    parse_inputs(body, spec, limits)
    return spec


def _interval(value: Any) -> tuple[float, float]:
    allowed = "[start, end], two ratios of the steps with 0 <= start <= end <= 1"
    if not isinstance(value, list) or len(value) != 2:
        raise FieldError("guidance_interval", value, allowed)
    start = _number("guidance_interval[0]", value[0], 0.0, 1.0)
    end = _number("guidance_interval[1]", value[1], 0.0, 1.0)
    if start > end:
        raise FieldError("guidance_interval", value, allowed)
    return start, end


def _cache(value: Any, steps: int) -> str:
    from ..cache_options import CACHE_GRAMMAR, cache_policies, check_policies, normalize_spec

    if not isinstance(value, str) or len(value) > 200:
        raise FieldError("cache", value, CACHE_GRAMMAR)
    try:
        check_policies(cache_policies(False, value, steps, "cache"), "cache")
    except ValueError as e:
        raise FieldError("cache", value, CACHE_GRAMMAR, " ".join(str(e).split())) from None
    return normalize_spec(value)
