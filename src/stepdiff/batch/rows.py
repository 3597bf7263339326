"""Rows of a batch: read from a text, JSONL or CSV file, defaults applied, checked, each with a content key.

Every problem names the file, the line, the field, the bad value and what is allowed, and is found
before any model loads. A row's content key is the hash of everything that decides its image: its
resolved parameters and the model's identity (see :func:`model_identity`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..limits import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, SIZE_LIMIT_RATIO  # noqa: F401 - importable here, as before
from ..request import FieldError, GenerationRequest, SizeRule, check_side, check_size

__all__ = [
    "FIELDS", "FORMATS", "BatchDefaults", "BatchRow", "RowError", "check_rows", "input_format", "model_identity",
    "parse_rows", "read_rows",
]

FORMATS = ("text", "jsonl", "csv")
_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
MAX_SIDE = 65536  # width and height; the model check refuses far less (8 times its native size)
_MAX_DIGITS = 30  # a whole number with more digits is beyond every limit here (seeds end at 2**64, 20 digits)

# The fields a JSONL object or a CSV header may name (aliases map onto them).
FIELDS = (
    "prompt", "negative_prompt", "seed", "steps", "width", "height", "size", "guidance_scale", "cfg_cutoff",
    "cfg_cutoff_step", "guidance_interval", "scheduler", "karras", "cache", "fast",
)
_ALIASES = {"negative": "negative_prompt", "guidance": "guidance_scale", "num_inference_steps": "steps"}


class RowError(ValueError):
    """A bad row: ``line`` is its line number in the input (1-based), ``str(e)`` says what and where."""

    def __init__(self, source: str, line: int, message: str) -> None:
        super().__init__(f"{source} line {line}: {message}")
        self.line = line
        self.reason = message


@dataclass(frozen=True)
class BatchDefaults:
    """What a row that leaves a field out gets (the CLI's flags). ``None``: the model's own value."""

    negative_prompt: str | None = None
    seed: int = 0  # a row without a seed gets seed + its index (0-based, data rows only)
    steps: int = 25
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    cfg_cutoff: float | None = None
    cfg_cutoff_step: int | None = None
    guidance_interval: tuple[float, float] | None = None
    scheduler: str | None = None
    karras: bool = False
    cache: str | None = None  # a step caching spec (stepdiff.caching.parse_cache_spec), normalized
    fast: bool = False  # the --fast preset (stepdiff.caching.fast_preset); not with cache


@dataclass(frozen=True)
class BatchRow:
    """One image to make. ``line`` is where it is in the input; ``index`` its place among the data rows."""

    line: int
    index: int
    prompt: str
    seed: int
    steps: int
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    cfg_cutoff: float | None = None
    cfg_cutoff_step: int | None = None
    guidance_interval: tuple[float, float] | None = None
    scheduler: str | None = None
    karras: bool = False
    cache: str | None = None
    fast: bool = False
    key: str = field(default="", compare=False)

    def params(self) -> dict[str, Any]:
        """The parameters that decide the image (what the key hashes, with the model). Step caching is named
        only when a row uses it, so the rows of a manifest written before it existed keep their keys."""
        params = {  # spelled out: dataclasses.asdict deep-copies, and planning a million rows calls this a million times
            "prompt": self.prompt, "seed": self.seed, "steps": self.steps, "width": self.width, "height": self.height,
            "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt, "cfg_cutoff": self.cfg_cutoff,
            "cfg_cutoff_step": self.cfg_cutoff_step,
            "guidance_interval": None if self.guidance_interval is None else list(self.guidance_interval),
            "scheduler": self.scheduler, "karras": self.karras,
        }
        if self.cache is not None:
            params["cache"] = self.cache
        if self.fast:
            params["fast"] = True
        return params

    def request(self) -> GenerationRequest:
        """The row as a request (for its guidance callbacks and its image's metadata)."""
        return GenerationRequest(
            prompt=self.prompt, negative_prompt=self.negative_prompt, seed=self.seed, steps=self.steps,
            width=self.width, height=self.height, guidance_scale=self.guidance_scale, cfg_cutoff=self.cfg_cutoff,
            cfg_cutoff_step=self.cfg_cutoff_step, guidance_interval=self.guidance_interval, scheduler=self.scheduler,
            karras=self.karras,
        )

    def group(self) -> tuple:
        """Rows with the same group can share one pipeline call (only prompt, negative prompt and seed differ)."""
        return (self.steps, self.width, self.height, self.guidance_scale, self.cfg_cutoff, self.cfg_cutoff_step,
                self.guidance_interval, self.scheduler, self.karras, self.cache, self.fast)

    @property
    def file_name(self) -> str:
        return f"{self.key[:20]}.png"


# ------------------------------------------------------------------------------------------- reading


def input_format(path: Path, format: str | None = None) -> str:
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
        return format
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"INPUT {str(path)!r}: can't tell its format from the name; it must end in "
                         f"{', '.join(_SUFFIXES)}, or pass --format {{{','.join(FORMATS)}}}")
    return fmt


def read_rows(path: str | Path, defaults: BatchDefaults = BatchDefaults(), format: str | None = None,
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


def parse_rows(text: str, fmt: str, defaults: BatchDefaults = BatchDefaults(), source: str = "INPUT",
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


# Lines end at \n, \r\n or \r (as the csv module and Python's text files split them), never at the other
# characters str.splitlines() also breaks at (U+2028, U+2029, U+0085, form feed, \x1c-\x1e, vertical tab):
# those are legal inside a JSON string and a prompt, so splitting there refused valid rows and shifted line numbers.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LINE_BREAK_BYTES = re.compile(rb"\r\n|\r|\n")
_QUOTE_HINT = ('a cell that starts with " must end with it; inside such a cell write a quote as "", e.g. '
               '"a ""big"" circle",3')


def _lines(text: str) -> list[str]:
    return _LINE_BREAK.split(text)


class _DuplicateKey(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json.loads would keep the last one without a word)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _json_row(source: str, n: int, line: str) -> dict[str, Any] | RowError:
    try:
        obj = json.loads(line, object_pairs_hook=_object, strict=False)  # strict=False: a raw tab or form feed in a string
    except _DuplicateKey as e:
        return RowError(source, n, f"key {e.args[0]!r} is given twice; give each field once")
    except json.JSONDecodeError as e:
        return RowError(source, n, f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
    except ValueError:  # a number with more digits than Python converts (4300)
        return RowError(source, n, "not valid JSON here (a number of more than 4300 digits)")
    except RecursionError:
        return RowError(source, n, "not valid JSON (arrays or objects nested too deeply)")
    if not isinstance(obj, dict):
        return RowError(source, n, f"must be a JSON object like {{\"prompt\": \"...\"}}, got {_short(obj)}")
    return obj


def _records(text: str, fmt: str, source: str) -> Iterable[tuple[int, dict[str, Any] | RowError]]:
    if fmt == "text":
        for n, line in enumerate(_lines(text), 1):
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                yield n, {"prompt": stripped}
    elif fmt == "jsonl":
        for n, line in enumerate(_lines(text), 1):
            if line.strip():
                yield n, _json_row(source, n, line)
    else:
        yield from _csv_records(text, source)


def _csv_records(text: str, source: str) -> Iterable[tuple[int, dict[str, Any] | RowError]]:
    """A CSV file's rows, read with strict quoting. A bad quote confined to one line is that row's error and
    reading goes on at the next line; a quoted cell that is never closed, or a bad quote in a cell that spans
    lines, leaves no way to tell where the rows after it begin, so the file is refused."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 0  # the line before the record being read

    def records() -> Iterable[tuple[int, list[str] | csv.Error]]:
        nonlocal start
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                first, last = start + 1, reader.line_num
                start = reader.line_num
                if "unexpected end of data" in str(e):
                    where = f"line {first}" if last <= first else f"lines {first}-{last}"
                    raise RowError(source, first, f"not valid CSV: a quoted cell opened on line {first} is never "
                                   f"closed, so {where} would be read as one row and the rows in it lost; "
                                   f"{_QUOTE_HINT}") from None
                if last > first:  # the error ends a record that spans lines: where the next row begins is a guess
                    raise RowError(source, first, f"not valid CSV: the row starting on line {first} runs to line "
                                   f"{last} and breaks there ({_csv_problem(e)}); the rows in it would be lost"
                                   ) from None
                yield first, e
                continue
            first, start = start + 1, reader.line_num
            yield first, cells

    rows = records()
    first = next(rows, None)
    if first is None:
        return
    header = first[1]
    if isinstance(header, csv.Error):
        raise RowError(source, 1, f"not valid CSV header ({_csv_problem(header)})")
    header = [h.strip() for h in header]
    seen: dict[str, str] = {}
    for name in header:
        key = _canonical(name)
        if key not in FIELDS:
            hint = ""
            if not name:
                hint = " (an empty column name: a comma too many in the header?)"
            elif any(c in name for c in ";\t|"):
                hint = " (the columns of a CSV file are separated by commas, not ';', tabs or '|')"
            raise RowError(source, 1, f"unknown column {name!r}{hint}; columns may be: {', '.join(FIELDS)}")
        if key in seen:
            twice = f"{name!r} twice" if seen[key] == name else f"{seen[key]!r} and {name!r} (both {key})"
            raise RowError(source, 1, f"the header names column {twice}; give each column once")
        seen[key] = name
    for n, cells in rows:
        if isinstance(cells, csv.Error):
            yield n, RowError(source, n, f"not valid CSV ({_csv_problem(cells)})")
            continue
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield n, RowError(source, n, f"has {len(cells)} cells but the header has {len(header)} columns")
            continue
        yield n, {h: c for h, c in zip(header, cells) if c.strip() != ""}  # an empty cell: the default


def _csv_problem(e: csv.Error) -> str:
    if "field larger than field limit" in str(e):
        return f"a cell is longer than {csv.field_size_limit()} characters"
    return f"{e}; {_QUOTE_HINT}"


def _canonical(name: str) -> str:
    return _ALIASES.get(name, name)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


# ------------------------------------------------------------------------------- against the model


def model_identity(folder: str | Path, dtype: str = "float32") -> str:
    """A fingerprint of a model folder (or single-file checkpoint): every config file's bytes and each weight file's
    name, size and first and last MiB (hashing whole multi-GB weights on every run would cost more than it protects)."""
    folder = Path(folder)
    h = hashlib.sha256(f"dtype={dtype}\n".encode())
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        rel = path.name if path == folder else path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as f:
            if path.suffix in (".json", ".txt") or size <= 2 * 2**20:
                h.update(f.read())
            else:
                h.update(f.read(2**20))
                f.seek(size - 2**20)
                h.update(f.read())
    return h.hexdigest()


def check_rows(rows: list[BatchRow], folder: str | Path, dtype: str, strict: bool, source: str = "INPUT",
               size_limit: bool = True) -> tuple[list[BatchRow], list[RowError]]:
    """Rows checked against the model (sizes, steps its scheduler can take), with the model's defaults
    filled in (size, guidance, scheduler) and each row's content key set. Reads configs only, no weights."""
    from ..cache_options import has_unet
    from ..limits import ModelShape
    from ..loading import default_guidance, scheduler_config
    from ..schedulers import karras_schedulers, make_scheduler, supports_karras

    folder = Path(folder)
    shape = ModelShape.from_folder(folder)
    config = scheduler_config(folder)
    guidance = default_guidance(folder)
    identity = model_identity(folder, dtype)
    unet = has_unet(folder)
    checked: dict[tuple, str | None] = {}
    cache_checked: dict[tuple, str | None] = {}
    out: list[BatchRow] = []
    errors: list[RowError] = []
    for row in rows:
        try:
            row = replace(
                row, width=shape.native_size if row.width is None else row.width,
                height=shape.native_size if row.height is None else row.height,
                guidance_scale=guidance if row.guidance_scale is None else row.guidance_scale,
                scheduler=row.scheduler or config.get("_class_name", "default"),
            )
            for name, v in (("width", row.width), ("height", row.height)):
                try:
                    check_side(v, name, SizeRule.of(shape))
                except FieldError as e:
                    raise RowError(source, row.line, str(e)) from None
                if size_limit and v > SIZE_LIMIT_RATIO * shape.native_size:
                    raise RowError(source, row.line, f"{name} {v} is more than {SIZE_LIMIT_RATIO} times the model's "
                                   f"native {shape.native_size} (the run would be slow and need a lot of memory)")
            sched = (row.scheduler, row.karras, row.steps)
            if sched not in checked:
                checked[sched] = _scheduler_problem(make_scheduler, supports_karras, karras_schedulers, config, *sched)
            if checked[sched] is not None:
                raise RowError(source, row.line, checked[sched])
            if row.cache is not None or row.fast:
                caching = (row.cache, row.fast)
                if caching not in cache_checked:
                    cache_checked[caching] = _cache_problem(row, unet)
                if cache_checked[caching] is not None:
                    raise RowError(source, row.line, cache_checked[caching])
        except RowError as e:
            if strict:
                raise
            errors.append(e)
            continue
        key = hashlib.sha256(json.dumps({"params": row.params(), "model": identity}, sort_keys=True).encode()).hexdigest()
        out.append(replace(row, key=key))
    return out, errors


def _cache_problem(row: BatchRow, unet: bool) -> str | None:
    """What this model refuses of a row's step caching (DeepCache and T-GATE need a UNet), or None."""
    from ..cache_options import cache_policies, check_policies

    name = "fast" if row.fast else "cache"
    try:
        check_policies(cache_policies(row.fast, row.cache, row.steps, name), name, unet)
    except ValueError as e:
        return " ".join(str(e).split())
    return None


def _scheduler_problem(make_scheduler, supports_karras, karras_schedulers, config: dict, name: str, karras: bool,
                       steps: int) -> str | None:
    import warnings

    if karras:
        try:
            if not supports_karras(name):
                return f"scheduler {name!r} has no Karras sigmas; use one of: {', '.join(karras_schedulers())}"
        except ValueError:
            pass
    train = int(config.get("num_train_timesteps", 1000))
    if steps <= train:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_scheduler(name, config, karras=karras).set_timesteps(steps)
    except ValueError as e:
        if "num_inference_steps" in str(e):
            return f"steps must be in [1, {train}] with scheduler {name!r} (trained with {train} steps), got {steps}"
    except Exception:
        return None
    return None
