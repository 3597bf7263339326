"""What a studio job asks for, checked field by field before any model work.

``parse_job(body, limits)`` turns a submitted JSON object into a ``JobSpec`` or raises ``FieldError``
naming the field, the bad value and what is allowed. The HTTP layer turns that into a 422 JSON error.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

from ..limits import DEFAULT_GUIDANCE, MAX_GUIDANCE, MAX_SEED
from ..request import FieldError, GenerationRequest, SizeRule, check_size

__all__ = ["MAX_PROMPT_CHARS", "FieldError", "JobSpec", "Limits", "PreviewSpec", "parse_job"]

MAX_PROMPT_CHARS = 2000  # far more than any text encoder reads (77 tokens); keeps requests and the database small
_LIMITS = (MAX_GUIDANCE, MAX_SEED)  # stepdiff.limits' (the CLI's and batch's too), still importable from here
_SOURCES = ("denoised", "latents")
_METHODS = ("auto", "tiny", "linear", "vae")


@dataclass(frozen=True)
class Limits:
    """What this server accepts: from the loaded model (sizes) and the server's flags."""

    native_size: int = 64
    size_multiple: int = 8
    min_size: int = 8
    max_size: int = 512
    max_steps: int = 500
    default_steps: int = 25
    default_guidance: float = DEFAULT_GUIDANCE
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
    guidance: float = DEFAULT_GUIDANCE
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
    ip_adapter_image: str | None = None  # an upload: the IP-Adapter's image (serve --ip-adapter)
    ip_adapter_scale: float | None = None  # with ip_adapter_image: 1.0
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
           "control_scale", "control_end", "num_images", "model", "loras", "ip_adapter_image", "ip_adapter_scale"}
_PREVIEW_FIELDS = {"every", "source", "method"}


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise FieldError(name, value, f"an integer in [{low}, {high}]")
    return int(value)


def _text_limits(body: dict[str, Any]) -> None:
    """What the studio adds to the request's text rules: a length a database row and a request should hold, no NUL."""
    for name in ("prompt", "negative_prompt"):
        value = body.get(name)
        if isinstance(value, str) and len(value) > MAX_PROMPT_CHARS:
            raise FieldError(name, f"<{len(value)} characters>", f"a string of at most {MAX_PROMPT_CHARS} characters")
        if isinstance(value, str) and "\x00" in value:
            raise FieldError(name, value, "text without NUL characters")


def _unknown(where: str, data: dict, known: set[str]) -> None:
    extra = sorted(set(data) - known)
    if extra:
        name = f"{where}{extra[0]}"
        names = ", ".join(sorted(known))
        raise FieldError(name, data[extra[0]], f"one of the known fields: {names}",
                         f"unknown field {name!r}; the known fields are {names}")


def parse_job(body: Any, limits: Limits) -> JobSpec:
    """A ``JobSpec`` from a submitted JSON object, every field checked (the request's validators, stepdiff.request,
    as the CLI and batch rows); defaults for those left out."""
    if not isinstance(body, dict):
        raise FieldError("body", body, "a JSON object")
    _unknown("", body, _FIELDS)
    _text_limits(body)
    request = _request(body, limits)
    spec = JobSpec(
        prompt=request.prompt, negative_prompt=request.negative_prompt or None, seed=request.seed, steps=request.steps,
        width=request.width, height=request.height, guidance=request.guidance_scale, scheduler=request.scheduler,
        cfg_cutoff=request.cfg_cutoff, guidance_interval=request.guidance_interval,
    )
    spec.fast, spec.cache = _caching(body, spec.steps)
    if body.get("preview") is not None:
        spec.preview = _preview(body["preview"], limits)
    from .fields import parse_inputs

    parse_inputs(body, spec, limits)
    return spec


def _request(body: dict[str, Any], limits: Limits) -> GenerationRequest:
    """The job's request fields, checked with the studio's names and limits; the server's defaults filled in."""
    get = body.get
    names = {"guidance_scale": "guidance"}
    width, height = get("width"), get("height")
    if get("size") is not None:
        if "width" in body or "height" in body:
            raise FieldError("size", body["size"], "left out when width and height are given")
        width, height = check_size(get("size"), "size")
        names.update(width="size width", height="size height")
    request = GenerationRequest(
        prompt=get("prompt"), negative_prompt=get("negative_prompt"), seed=0 if get("seed") is None else get("seed"),
        steps=limits.default_steps if get("steps") is None else get("steps"), width=width, height=height,
        guidance_scale=get("guidance"), cfg_cutoff=get("cfg_cutoff"), guidance_interval=get("guidance_interval"),
        scheduler=get("scheduler"),
    )
    rule = SizeRule(limits.size_multiple, limits.min_size, limits.max_size)
    request = request.validate(names, max_steps=limits.max_steps, size=rule)
    return request.with_model_defaults(limits.default_guidance, limits.native_size)


def _caching(body: dict[str, Any], steps: int) -> tuple[bool, str | None]:
    fast = body.get("fast")
    if fast is not None and not isinstance(fast, bool):
        raise FieldError("fast", fast, "true or false")
    if body.get("cache") is None:
        return bool(fast), None
    if fast:
        raise FieldError("cache", body["cache"], "left out when fast is true (fast is a cache preset)")
    return False, _cache(body["cache"], steps)


def _preview(preview: Any, limits: Limits) -> PreviewSpec:
    if not isinstance(preview, dict):
        raise FieldError("preview", preview, "an object with every, source, method")
    _unknown("preview.", preview, _PREVIEW_FIELDS)
    p = PreviewSpec()
    if preview.get("every") is not None:
        p.every = _int("preview.every", preview["every"], 1, limits.max_steps)
    for name, allowed in (("source", _SOURCES), ("method", _METHODS)):
        if preview.get(name) is not None:
            if preview[name] not in allowed:
                raise FieldError(f"preview.{name}", preview[name], f"one of {', '.join(allowed)}")
            setattr(p, name, preview[name])
    return p


def _cache(value: Any, steps: int) -> str:
    from ..cache_options import CACHE_GRAMMAR, cache_policies, check_policies, normalize_spec

    if not isinstance(value, str) or len(value) > 200:
        raise FieldError("cache", value, CACHE_GRAMMAR)
    try:
        check_policies(cache_policies(False, value, steps, "cache"), "cache")
    except ValueError as e:
        raise FieldError("cache", value, CACHE_GRAMMAR, " ".join(str(e).split())) from None
    return normalize_spec(value)
