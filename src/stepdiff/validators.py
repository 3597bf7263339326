"""One validator per request field, ``check_<field>(value, name)``: the value in its type, or
``FieldError(field, value, allowed)`` naming the caller's spelling of the field, the value and what is allowed.
Used by :class:`stepdiff.request.GenerationRequest` (which re-exports them) and by the callers' own extra fields."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .limits import MAX_CONTROL_SCALE, MAX_GUIDANCE, MAX_SEED, MAX_STEPS

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
