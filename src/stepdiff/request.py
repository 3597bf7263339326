"""One generation request, checked the same way for every caller: CLI generate, batch rows and studio jobs.

Each field has one validator, ``check_<field>(value, name)``, that returns the value in its type or raises
``FieldError(field, value, allowed)``. ``name`` is the caller's spelling of the field: ``--guidance`` for the CLI,
``guidance_scale`` for a batch row, ``guidance`` for a studio job; so the message names what the user typed.
:meth:`GenerationRequest.validate` runs them all and the rules between fields. Each caller adapts a ``FieldError``
to its own way of saying no: the CLI exits 2 with one line, a batch row names its line, the studio answers HTTP 422
with the field. Text from a CSV cell is turned into numbers by the batch reader first; the validators take values.

Then the request builds what a run needs: the pipeline call's keyword arguments (:meth:`call_kwargs`), the
guidance callbacks (:meth:`guidance_callbacks`) and each image's metadata (:meth:`image_settings`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

from .limits import DEFAULT_GUIDANCE, MAX_CONTROL_SCALE, MAX_GUIDANCE, MAX_SEED, MAX_STEPS

__all__ = [
    "DEFAULT_GUIDANCE",
    "MAX_CONTROL_SCALE",
    "MAX_GUIDANCE",
    "MAX_SEED",
    "MAX_STEPS",
    "FieldError",
    "GenerationRequest",
    "SizeRule",
    "check_cfg_cutoff",
    "check_cfg_cutoff_step",
    "check_control_end",
    "check_control_scale",
    "check_guidance",
    "check_guidance_interval",
    "check_negative_prompt",
    "check_num_images",
    "check_number",
    "check_prompt",
    "check_scheduler",
    "check_seed",
    "check_side",
    "check_size",
    "check_steps",
    "check_strength",
    "default_strength",
    "parse_interval",
]

MAX_SIDE = 65536  # width and height before a model's own rule (SizeRule) is known
_SATURATES = " (far above 10 the images saturate to black or white)"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_unicode(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: JSON and the command line allow a lone surrogate (\\ud800) that no
    file, database row or response body can hold as text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class FieldError(ValueError):
    """A bad field: ``field`` (as the caller spells it: a flag, a row's field, a dotted JSON path), the bad ``value``
    and what is ``allowed``. ``str(e)`` is one sentence naming all three (or ``message``, where one reads better)."""

    def __init__(self, field: str, value: Any, allowed: str, message: str | None = None, note: str = "") -> None:
        self.field, self.value, self.allowed, self.note = field, value, allowed, note
        self.custom = message is not None
        super().__init__(message if message is not None else f"{field} must be {allowed}, got {_show(value)}{note}")

    def render(self, value: Any, show: Callable[[Any], str] = _show) -> str:
        """The message again with ``value`` shown by ``show`` (a batch row shows the text it read, as JSON writes it)."""
        if self.custom:
            return str(self)
        return f"{self.field} must be {self.allowed}, got {show(value)}{self.note}"

    def to_dict(self) -> dict[str, Any]:
        """As an HTTP 422 body: ``error``, ``field``, ``value`` (shown as text where JSON can't hold it), ``allowed``."""
        value = self.value
        if isinstance(value, float) and not math.isfinite(value):
            value = repr(value)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**80:
            value = _show(value)  # an integer too large for a float field: its first digits, as text
        elif isinstance(value, str) and not _is_unicode(value):
            value = _show(value)  # a lone surrogate has no UTF-8 form: shown escaped, as repr writes it
        elif not isinstance(value, (int, float, bool, type(None))) and not (isinstance(value, str) and len(value) <= 80):
            value = _show(value)
        return {"error": str(self), "field": self.field, "value": value, "allowed": self.allowed}


# ------------------------------------------------------------------------------------------ the kinds of value


def _integer(value: Any, name: str, low: int, high: int | None = None, high_text: str = "") -> int:
    bounds = f">= {low}" if high is None else f"in [{low}, {high_text or high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise FieldError(name, value, f"an integer {bounds}")
    if value < low or (high is not None and value > high):
        raise FieldError(name, value, bounds)
    return int(value)


def _real(value: Any, name: str, low: float, high: float, low_open: bool = False, note: str = "") -> float:
    allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FieldError(name, value, allowed, note=note)
    try:
        number = float(value)  # an integer such as 10**400 has no float: OverflowError
    except (OverflowError, ValueError):
        raise FieldError(name, value, allowed, note=note) from None
    if not math.isfinite(number) or not (low < number if low_open else low <= number) or number > high:
        raise FieldError(name, value, allowed, note=note)
    return number


def check_number(value: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    """A real number in [low, high] (``low_open``: (low, high]), for fields beyond the request's (a steer, a scale)."""
    return _real(value, name, low, high, low_open)


def _text(value: Any, name: str, allowed: str) -> str:
    if not isinstance(value, str):
        raise FieldError(name, value, allowed)
    if not _is_unicode(value):
        raise FieldError(name, value, "valid UTF-8 text (no lone surrogate such as \\ud800)",
                         f"{name} is not valid UTF-8 text: {value[:40]!r}")
    return value


# ------------------------------------------------------------------------------------ one validator per field


def check_prompt(value: Any, name: str = "prompt", allow_empty: bool = False) -> str:
    """What to draw: text (the CLI also takes an empty prompt, an unconditional picture)."""
    text = _text(value, name, "a non-empty string")
    if not allow_empty and not text.strip():
        raise FieldError(name, value, "a non-empty string")
    return text


def check_negative_prompt(value: Any, name: str = "negative_prompt") -> str:
    return _text(value, name, "a string")


def check_seed(value: Any, name: str = "seed") -> int:
    return _integer(value, name, 0, MAX_SEED, "2**64-1")


def check_steps(value: Any, name: str = "steps", max_steps: int = MAX_STEPS) -> int:
    return _integer(value, name, 1, max_steps)


@dataclass(frozen=True)
class SizeRule:
    """What a model takes for width and height (stepdiff.limits.ModelShape); ``largest`` None: no upper limit."""

    multiple: int = 8
    smallest: int = 8
    largest: int | None = None

    @classmethod
    def of(cls, shape: Any, largest: int | None = None) -> SizeRule:
        return cls(shape.size_multiple, shape.min_size, largest)


def check_side(value: Any, name: str = "width", rule: SizeRule | None = None) -> int:
    """A width or height: any in [8, 65536] until the model is known, then what ``rule`` allows."""
    if rule is None:
        return _integer(value, name, 8, MAX_SIDE)
    allowed = f"a positive multiple of {rule.multiple}, at least {rule.smallest} for this model"
    if rule.largest is not None:
        allowed += f" and at most {rule.largest}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value % rule.multiple \
            or value < rule.smallest or (rule.largest is not None and value > rule.largest):
        raise FieldError(name, value, allowed)
    return int(value)


def check_size(value: Any, name: str = "size") -> tuple[int, int]:
    """``WIDTHxHEIGHT`` text (``64x64``, ``64 X 64``) as ``(width, height)``."""
    parts = value.lower().split("x") if isinstance(value, str) else []
    texts = [p.strip() for p in parts]
    if len(texts) != 2 or not all(t.isdecimal() for t in texts):
        raise FieldError(name, value, "WIDTHxHEIGHT, e.g. 64x64", f"{name} must look like WIDTHxHEIGHT, e.g. 64x64, "
                         f"got {_show(value)}")
    if any(len(t.lstrip("0")) > 30 for t in texts):  # beyond every size (and maybe int()'s 4300 digits)
        raise FieldError(name, value, "WIDTHxHEIGHT, e.g. 64x64", f"{name} {_show(value)} is far beyond any size a "
                         "model takes")
    return int(texts[0]), int(texts[1])


def check_guidance(value: Any, name: str = "guidance_scale") -> float:
    return _real(value, name, 0.0, MAX_GUIDANCE, note=_SATURATES)


def check_cfg_cutoff(value: Any, name: str = "cfg_cutoff") -> float:
    """Guidance off after this fraction of the steps."""
    return _real(value, name, 0.0, 1.0)


def check_cfg_cutoff_step(value: Any, name: str = "cfg_cutoff_step") -> int:
    return _integer(value, name, 0)


def parse_interval(value: Any, name: str = "guidance_interval") -> tuple[float, float]:
    """Guidance only in [start, end) of the steps (Kynkäänniemi et al. 2024): ``"0.2,0.8"`` or ``[0.2, 0.8]``."""
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        raise FieldError(name, value, 'two ratios START,END in [0, 1], e.g. "0.2,0.8"')
    start, end = (_real(_number(p), f"{name}[{i}]", 0.0, 1.0) for i, p in enumerate(parts))
    if start > end:
        raise FieldError(name, value, "START,END with 0 <= START <= END <= 1")
    return start, end


check_guidance_interval = parse_interval


def _number(part: Any) -> Any:
    """A ratio written as text (``"0.2"`` in ``"0.2,0.8"``) as a float; anything else as it is."""
    if isinstance(part, str):
        try:
            return float(part.strip())
        except ValueError:
            return part
    return part


def check_scheduler(value: Any, name: str = "scheduler") -> str:
    """An alias (euler, dpm++2m, ...) or a diffusers scheduler class name."""
    from .schedulers import scheduler_class, scheduler_names

    allowed = f"one of: {', '.join(scheduler_names())}"
    if not isinstance(value, str) or not _is_unicode(value):
        raise FieldError(name, value, allowed)
    try:
        scheduler_class(value)
    except ValueError as e:
        raise FieldError(name, value, allowed, f"{name}: {e}") from None
    return value


def check_num_images(value: Any, name: str = "num_images", most: int | None = None) -> int:
    return _integer(value, name, 1, most)


def check_strength(value: Any, name: str = "strength") -> float:
    """How much of the init image is re-drawn."""
    return _real(value, name, 0.0, 1.0, low_open=True)


def default_strength(mask: Any) -> float:
    return 1.0 if mask is not None else 0.6


def check_control_scale(value: Any, name: str = "control_scale") -> float:
    return _real(value, name, 0.0, MAX_CONTROL_SCALE)


def check_control_end(value: Any, name: str = "control_end") -> float:
    """The ControlNet stops after this fraction of the steps."""
    return _real(value, name, 0.0, 1.0, low_open=True)


# ------------------------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class GenerationRequest:
    """What one generation asks for. ``None``: left out (the model's or the kind's default).

    Pictures (``init_image``, ``mask_image``, ``control_image``) are PIL images, or whatever the caller resolves
    them from later (the studio's upload ids); sizes are compared only between pictures.
    """

    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int = 25
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    cfg_cutoff: float | None = None
    cfg_cutoff_step: int | None = None
    guidance_interval: tuple[float, float] | None = None
    scheduler: str | None = None
    karras: bool = False
    num_images: int = 1
    init_image: Any = None
    strength: float | None = None
    mask_image: Any = None
    control_image: Any = None
    control_scale: float | None = None
    control_end: float | None = None

    def validate(self, names: Mapping[str, str] | None = None, *, max_steps: int = MAX_STEPS,
                 size: SizeRule | None = None, allow_empty_prompt: bool = False,
                 max_images: int | None = None) -> GenerationRequest:
        """Every field checked; returns the request with values in their types and the kind's defaults (strength).
        ``names`` maps a field to the caller's spelling of it (``{"seed": "--seed"}``)."""
        name = _Names(names)
        checks: dict[str, Callable[[Any, str], Any]] = {
            "prompt": partial(check_prompt, allow_empty=allow_empty_prompt), "negative_prompt": check_negative_prompt,
            "seed": check_seed, "steps": partial(check_steps, max_steps=max_steps),
            "width": partial(check_side, rule=size), "height": partial(check_side, rule=size),
            "guidance_scale": check_guidance, "cfg_cutoff": check_cfg_cutoff, "cfg_cutoff_step": check_cfg_cutoff_step,
            "guidance_interval": parse_interval, "scheduler": check_scheduler,
            "num_images": partial(check_num_images, most=max_images), "strength": check_strength,
            "control_scale": check_control_scale, "control_end": check_control_end,
        }
        values = {f: check(getattr(self, f), name(f)) for f, check in checks.items() if getattr(self, f) is not None}
        request = replace(self, **values)
        request._check_guidance_shaping(name)
        request._check_seeds(name)
        request._check_pictures(name, size)
        return request._check_control(name)._with_strength(name)

    # The rules between fields, each apart so that every function stays short.

    def _check_guidance_shaping(self, name: _Names) -> None:
        given = [f for f in ("cfg_cutoff", "cfg_cutoff_step", "guidance_interval") if getattr(self, f) is not None]
        if len(given) > 1:
            one = ", ".join(name(f) for f in ("cfg_cutoff", "cfg_cutoff_step")) + f" and {name('guidance_interval')}"
            raise FieldError(name(given[1]), getattr(self, given[1]), f"left out when {name(given[0])} is given",
                             f"give one of {one}, not {' and '.join(name(f) for f in given)}")

    def _check_seeds(self, name: _Names) -> None:
        if self.seed + self.num_images - 1 > MAX_SEED:  # image k has seed + k
            raise FieldError(name("num_images"), self.num_images, f"at most {MAX_SEED - self.seed + 1} with "
                             f"{name('seed')} {self.seed} (image k has seed + k - 1, at most 2**64-1)",
                             f"{name('seed')} {self.seed} with {name('num_images')} {self.num_images} runs past the "
                             "largest seed, 2**64-1")

    def _check_pictures(self, name: _Names, size: SizeRule | None) -> None:
        init = name("init_image")
        for f in ("mask_image", "strength"):
            if getattr(self, f) is not None and self.init_image is None:
                raise FieldError(name(f), getattr(self, f), f"left out without {init}",
                                 f"{name(f)} needs {init} (the picture to start from)")
        picture = _size_of(self.init_image)
        if picture is None:
            return
        mask = _size_of(self.mask_image)
        if mask is not None and mask != picture:
            raise FieldError(name("mask_image"), f"{mask[0]}x{mask[1]}", f"{picture[0]}x{picture[1]}, as {init}",
                             f"{name('mask_image')} is {mask[0]}x{mask[1]} but {init} is {picture[0]}x{picture[1]}; "
                             "they must be the same size")
        asked = (self.width, self.height)
        if asked != (None, None) and asked != picture:
            raise FieldError(name("size"), f"{asked[0]}x{asked[1]}", f"left out with {init}",
                             f"{name('size')} {asked[0]}x{asked[1]} differs from {init}'s {picture[0]}x{picture[1]}; "
                             f"leave {name('size')} out (the picture's size is used) or resize the picture")
        if size is not None:
            for side, v in zip(("width", "height"), picture):
                check_side(v, f"{init} {side}", size)

    def _check_control(self, name: _Names) -> GenerationRequest:
        control = name("control_image")
        if self.control_image is None:
            for f in ("control_scale", "control_end"):
                if getattr(self, f) is not None:
                    raise FieldError(name(f), getattr(self, f), f"left out without {control}",
                                     f"{name(f)} needs {control} (the control picture)")
            return self
        if self.mask_image is not None:
            raise FieldError(control, "(a picture)", f"left out with {name('mask_image')}",
                             f"{control} with {name('mask_image')} (ControlNet inpainting) is not supported; use one "
                             "or the other")
        picture, output = _size_of(self.control_image), self.output_size
        if picture is not None and output is not None and picture != output:
            raise FieldError(control, f"{picture[0]}x{picture[1]}", f"{output[0]}x{output[1]}, the output size",
                             f"{control} is {picture[0]}x{picture[1]} but the output is {output[0]}x{output[1]}; give "
                             "a control picture of the output size")
        return replace(self, control_scale=1.0 if self.control_scale is None else self.control_scale,
                       control_end=1.0 if self.control_end is None else self.control_end)

    def _with_strength(self, name: _Names) -> GenerationRequest:
        if self.init_image is None:
            return self
        strength = default_strength(self.mask_image) if self.strength is None else self.strength
        if int(self.steps * strength) < 1:
            raise FieldError(name("strength"), strength, f"at least 1/steps = {1 / self.steps:g} with {name('steps')} "
                             f"{self.steps}",
                             f"{name('strength')} {strength} with {name('steps')} {self.steps} leaves no denoising step "
                             f"(int({self.steps} x {strength}) = 0); raise {name('strength')} or {name('steps')}")
        return replace(self, strength=strength)

    # What the request builds.

    @property
    def kind(self) -> str:
        """text2image, image2image or inpaint (a ControlNet rides on any of the first two)."""
        if self.init_image is None:
            return "text2image"
        return "image2image" if self.mask_image is None else "inpaint"

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(width, height): the init image's, else the asked size; None while the model's default is unknown."""
        picture = _size_of(self.init_image)
        if picture is not None:
            return picture
        return None if self.width is None or self.height is None else (self.width, self.height)

    @property
    def run_steps(self) -> int:
        """Denoising steps that run: image to image runs int(steps * strength) of them, as the classic pipelines."""
        if self.init_image is None or self.strength is None:
            return self.steps
        return max(1, min(self.steps, int(self.steps * self.strength)))

    def with_model_defaults(self, default_guidance: float = DEFAULT_GUIDANCE,
                            native_size: int | None = None) -> GenerationRequest:
        """The model's defaults for what was left out: its guidance scale and (with ``native_size``) its size."""
        request = self
        if self.guidance_scale is None:
            request = replace(request, guidance_scale=float(default_guidance))
        if native_size is not None and self.init_image is None:
            request = replace(request, width=self.width or native_size, height=self.height or native_size)
        return request

    def guidance_callbacks(self) -> list[Any]:
        """The callbacks that shape guidance over the steps: a CFG cutoff (ratio or step) or a guidance interval."""
        from .callbacks import CFGCutoffCallback, GuidanceIntervalCallback

        callbacks: list[Any] = []
        if self.cfg_cutoff is not None:
            callbacks.append(CFGCutoffCallback(cutoff_step_ratio=self.cfg_cutoff))
        if self.cfg_cutoff_step is not None:
            callbacks.append(CFGCutoffCallback(cutoff_step_index=self.cfg_cutoff_step))
        if self.guidance_interval is not None:
            start, end = self.guidance_interval
            callbacks.append(GuidanceIntervalCallback(start_ratio=start, end_ratio=end))
        return callbacks

    def generators(self, device: str = "cpu") -> list[Any]:
        """One ``torch.Generator`` per image: image k is seeded with seed + k."""
        import torch

        return [torch.Generator(device).manual_seed(self.seed + i) for i in range(self.num_images)]

    def call_kwargs(self, device: str = "cpu") -> dict[str, Any]:
        """The pipeline call's keyword arguments (after :meth:`with_model_defaults`), callbacks left to the caller."""
        kwargs: dict[str, Any] = {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "num_inference_steps": self.steps,
            "guidance_scale": DEFAULT_GUIDANCE if self.guidance_scale is None else self.guidance_scale,
            "num_images_per_prompt": self.num_images, "generator": self.generators(device),
        }
        kind = self.kind
        if kind != "text2image":
            kwargs.update(image=self.init_image, strength=self.strength)
        if kind == "inpaint":
            kwargs["mask_image"] = self.mask_image
        size = self.output_size
        if kind != "image2image" and size is not None:  # image to image takes the picture's size
            kwargs.update(width=size[0], height=size[1])
        if self.control_image is not None:
            kwargs["control_image" if kind == "image2image" else "image"] = self.control_image
            kwargs.update(controlnet_conditioning_scale=1.0 if self.control_scale is None else self.control_scale,
                          control_guidance_end=1.0 if self.control_end is None else self.control_end)
        return kwargs

    def image_settings(self, model: str, index: int = 0, **more: Any) -> Any:
        """The metadata of image ``index`` (its own seed); ``more``: the caller's fields (init image path, cache...)."""
        from .metadata import ImageSettings

        return ImageSettings(
            prompt=self.prompt, negative_prompt=self.negative_prompt, seed=self.seed + index, steps=self.steps,
            guidance_scale=DEFAULT_GUIDANCE if self.guidance_scale is None else self.guidance_scale, model=model,
            cfg_cutoff_ratio=self.cfg_cutoff, cfg_cutoff_step=self.cfg_cutoff_step, strength=self.strength,
            **more,
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


class _Names:
    """A field's name as the caller spells it."""

    def __init__(self, names: Mapping[str, str] | None) -> None:
        self.names = names or {}

    def __call__(self, field: str) -> str:
        return self.names.get(field, field)


def _size_of(picture: Any) -> tuple[int, int] | None:
    size = getattr(picture, "size", None)
    return (int(size[0]), int(size[1])) if isinstance(size, tuple) and len(size) == 2 else None
