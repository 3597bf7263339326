"""Rows of a batch: read from a text, JSONL or CSV file, defaults applied, checked, each with a content key.

Every problem names the file, the line, the field, the bad value and what is allowed, and is found
before any model loads. A row's content key is the hash of everything that decides its image: its
resolved parameters and the model's identity (see :func:`model_identity`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..limits import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, SIZE_LIMIT_RATIO  # noqa: F401 - importable here, as before
from ..request import FieldError, GenerationRequest, check_size
from ..validators import MAX_SIDE  # noqa: F401 - importable here, as before
from .checks import check_rows, model_identity
from .formats import _LINE_BREAK_BYTES, FORMATS, _records, input_format
from .row_types import FIELDS, BatchDefaults, BatchRow, RowError, _canonical, _short

__all__ = [
    "FIELDS", "FORMATS", "BatchDefaults", "BatchRow", "RowError", "check_rows", "input_format", "model_identity",
    "parse_rows", "read_rows",
]

_MAX_DIGITS = 30  # a whole number with more digits is beyond every limit here (seeds end at 2**64, 20 digits)


def read_rows(path: str | Path, defaults: BatchDefaults = BatchDefaults(), format: str | None = None,  # noqa: B008 - frozen
              strict: bool = True) -> tuple[list[BatchRow], list[RowError]]:
    """The rows of ``path`` with ``defaults`` applied: ``(rows, errors)``. ``strict`` raises the first bad row.

    A text file has one prompt a line (blank lines and lines starting with ``#`` are skipped). A JSONL file
    has one object a line; a CSV file has a header row. Both name fields from :data:`FIELDS`.
    """
    path = Path(path)
    fmt = input_format(path, format)
    if not path.is_file():
        raise FileNotFoundError(f"INPUT {str(path)!r} does not exist" if not path.exists()
                                else f"INPUT {str(path)!r} is not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = len(_LINE_BREAK_BYTES.findall(data[: e.start])) + 1
        raise ValueError(f"INPUT {str(path)!r} line {line}: not UTF-8 text ({e.reason})") from None
    return parse_rows(text, fmt, defaults, source=str(path), strict=strict)


def parse_rows(text: str, fmt: str, defaults: BatchDefaults = BatchDefaults(), source: str = "INPUT",  # noqa: B008 - frozen
               strict: bool = True) -> tuple[list[BatchRow], list[RowError]]:
    rows: list[BatchRow] = []
    errors: list[RowError] = []
    index = 0
    for line, raw in _records(text, fmt, source):
        try:
            if isinstance(raw, RowError):
                raise raw
            rows.append(_row(raw, line, index, defaults, source))
        except RowError as e:
            if strict:
                raise
            errors.append(e)
        index += 1
    if not rows and not errors:
        raise ValueError(f"{source}: no rows (a text file needs one prompt a line; JSONL one object a line; "
                         "CSV a header and rows)")
    return rows, errors


# ------------------------------------------------------------------------------------------- one row


def _row(raw: dict[str, Any], line: int, index: int, d: BatchDefaults, source: str) -> BatchRow:
    """One row, checked as a stepdiff.request.GenerationRequest (the CLI's and the studio's checks), its line named."""
    from_csv = all(isinstance(v, str) for v in raw.values())

    def bad(message: str) -> RowError:
        return RowError(source, line, message)

    values = _fields(raw, bad)
    if "prompt" not in values:
        raise bad("has no prompt")
    try:
        request = _request(values, index, d, bad).validate()
    except FieldError as e:  # shown as the row wrote it (a CSV cell's text, JSON's spelling)
        raise bad(e.render(values[e.field], _short) if e.field in values else str(e)) from None
    karras = _bool(bad, values.get("karras", d.karras), from_csv)
    cache, fast = _caching(bad, values, d, request.steps, from_csv)
    return BatchRow(
        line=line, index=index, prompt=request.prompt, seed=request.seed, steps=request.steps, width=request.width,
        height=request.height, guidance_scale=request.guidance_scale, negative_prompt=request.negative_prompt,
        cfg_cutoff=request.cfg_cutoff, cfg_cutoff_step=request.cfg_cutoff_step,
        guidance_interval=request.guidance_interval, scheduler=request.scheduler, karras=karras, cache=cache, fast=fast,
    )


def _fields(raw: dict[str, Any], bad) -> dict[str, Any]:
    """The row's fields under their own names (aliases mapped); unknown fields and a field given twice refused."""
    values: dict[str, Any] = {}
    for name, value in raw.items():
        key = _canonical(name)
        if key not in FIELDS:
            raise bad(f"unknown field {name!r}; fields may be: {', '.join(FIELDS)}")
        if key in values:
            raise bad(f"field {key!r} is given twice (as {name!r} too)")
        values[key] = value
    return values


def _request(values: dict[str, Any], index: int, d: BatchDefaults, bad) -> GenerationRequest:
    """The row over the defaults, numbers read from text; the request's validators check the values."""
    get = values.get
    width, height = d.width, d.height
    if "size" in values:
        if "width" in values or "height" in values:
            raise bad("give size or width/height, not both")
        width, height = check_size(values["size"])
    shaping = ("cfg_cutoff", "cfg_cutoff_step", "guidance_interval")
    own = any(n in values for n in shaping)  # the row's own choice replaces the defaults' guidance shaping
    cutoff, step, interval = (get(n) for n in shaping) if own else (d.cfg_cutoff, d.cfg_cutoff_step, d.guidance_interval)
    return GenerationRequest(
        prompt=values["prompt"], negative_prompt=get("negative_prompt", d.negative_prompt),
        seed=_whole(bad, "seed", get("seed", d.seed + index)), steps=_whole(bad, "steps", get("steps", d.steps)),
        width=_whole(bad, "width", get("width", width)), height=_whole(bad, "height", get("height", height)),
        guidance_scale=_real(get("guidance_scale", d.guidance_scale)), cfg_cutoff=_real(cutoff),
        cfg_cutoff_step=_whole(bad, "cfg_cutoff_step", step), guidance_interval=interval,
        scheduler=get("scheduler", d.scheduler),
    )


def _caching(bad, values: dict[str, Any], d: BatchDefaults, steps: int, from_csv: bool) -> tuple[str | None, bool]:
    if "cache" not in values and "fast" not in values:
        return d.cache, d.fast
    # the row's own choice replaces the defaults' step caching
    fast = _bool(bad, values.get("fast", False), from_csv, "fast")
    cache = None if values.get("cache") is None else _cache(bad, values["cache"], steps)
    if fast and cache is not None:
        raise bad("give cache or fast, not both (fast is a cache preset)")
    return cache, fast


def _whole(bad, name: str, value: Any) -> Any:
    """A whole number as a row writes it: text (any Unicode digits, "1_000") or a number with no fraction; None
    stays None. Beyond 30 digits: a number past every limit, which the request's validator refuses."""
    if isinstance(value, str):
        text = value.strip()
        digits = text.lstrip("+-").replace("_", "").lstrip("0")
        if digits.isdecimal() and len(digits) > _MAX_DIGITS:  # beyond every limit (and maybe int()'s 4300 digits)
            return -(10**_MAX_DIGITS) if text.startswith("-") else 10**_MAX_DIGITS
        try:
            return int(text)  # as before: any Unicode digits ("７"), "1_000"
        except ValueError:
            raise bad(f"{name} must be a whole number, got {_short(value)}") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad(f"{name} must be a whole number, got {_short(value)}")
    return value


def _real(value: Any) -> Any:
    """A number as a row writes it (text, or an integer too large for a float: infinity, out of every range)."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        number = _float(value)
        return value if number is None else number
    return value


def _float(value: str | int) -> float | None:
    """``value`` as a float (huge numbers: infinity, so a range check refuses them); None if it is no number."""
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except OverflowError:  # an int beyond float's range
        return math.inf if value > 0 else -math.inf  # type: ignore[operator]
    except ValueError:
        return None


def _bool(bad, value: Any, from_csv: bool, name: str = "karras") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise bad(f"{name} must be true or false, got {_short(value)}")


def _cache(bad, value: Any, steps: int) -> str:
    """A row's step caching spec, checked (grammar, values, combinations) and normalized."""
    from ..cache_options import cache_policies, check_policies, normalize_spec

    if not isinstance(value, str):
        raise bad(f"cache must be a spec string like \"deepcache:3,tgate:10\", got {_short(value)}")
    try:
        check_policies(cache_policies(False, value, steps, "cache"), "cache")
    except ValueError as e:
        raise bad(" ".join(str(e).split())) from None
    return normalize_spec(value)
