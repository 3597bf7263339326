"""Reading a batch file's records: a text file (one prompt a line), JSONL (one object a line) or CSV (a header and
rows), each record with its line number, or the ``RowError`` that says why its line cannot be read."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .row_types import FIELDS, RowError, _canonical, _short

__all__ = ["FORMATS", "input_format"]

FORMATS = ("text", "jsonl", "csv")
_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


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


def _csv_lines(text: str, source: str) -> Iterable[tuple[int, list[str] | csv.Error]]:
    """Each CSV record's first line and cells, or the ``csv.Error`` of a bad quote confined to one line (reading
    goes on at the next line). A quoted cell never closed, or a bad quote in a record that spans lines, raises
    ``RowError``: where the rows after it begin is a guess."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 0  # the line before the record being read
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


def _csv_header(header: list[str] | csv.Error, source: str) -> list[str]:
    """The header's column names, each a known field given once."""
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
    return header


def _csv_records(text: str, source: str) -> Iterable[tuple[int, dict[str, Any] | RowError]]:
    """A CSV file's rows, read with strict quoting. A bad quote confined to one line is that row's error and
    reading goes on at the next line; a quoted cell that is never closed, or a bad quote in a cell that spans
    lines, leaves no way to tell where the rows after it begin, so the file is refused."""
    rows = _csv_lines(text, source)
    first = next(rows, None)
    if first is None:
        return
    header = _csv_header(first[1], source)
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
