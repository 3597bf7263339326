"""stepdiff batch, embedded: rows (formats, defaults, every bad input), keys, manifest, resume, crash, CLI.

The Ray runs are in test_batch_ray.py. Runs here use the tiny random SD model and 2 steps.
"""

import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stepdiff.batch import BatchConfig, BatchDefaults, Manifest, RowError, plan_batch, read_rows, run_batch
from stepdiff.batch.manifest import folder_lock
from stepdiff.batch.rows import check_rows, model_identity, parse_rows
from stepdiff.batch.runner import RowFailed
from stepdiff.batch.worker import ChunkWorker

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a white circle", "a black square"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config(tmp_path, sd_folder, input, **kw) -> BatchConfig:
    kw.setdefault("defaults", BatchDefaults(steps=2))
    return BatchConfig(input=input, out=tmp_path / "out", model=sd_folder, progress=False, **kw)


def pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.tobytes()


def stepdiff_chunk(path: Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.info["stepdiff"])


# ------------------------------------------------------------------------------------------- rows


def test_text_rows_skip_blank_and_comment_lines_and_number_lines(tmp_path):
    rows, errors = read_rows(write(tmp_path / "p.txt", "a red circle\n\n# a comment\n  a blue square  \n"),
                             BatchDefaults(seed=10, steps=3))
    assert errors == []
    assert [(r.line, r.index, r.prompt, r.seed, r.steps) for r in rows] == [
        (1, 0, "a red circle", 10, 3), (4, 1, "a blue square", 11, 3)]


def test_jsonl_rows_set_every_field_and_aliases(tmp_path):
    lines = [
        {"prompt": "a", "negative_prompt": "b", "seed": 7, "steps": 4, "size": "32x48", "guidance": 3.5,
         "cfg_cutoff": 0.5, "scheduler": "euler", "karras": True},
        {"prompt": "c", "negative": "d", "width": 40, "height": 24, "guidance_scale": 2, "cfg_cutoff_step": 1},
        {"prompt": "e", "guidance_interval": [0.2, 0.8], "num_inference_steps": 5},
        {"prompt": "f", "guidance_interval": "0.1,0.9"},
    ]
    rows, _ = read_rows(write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n"),
                        BatchDefaults(steps=9, cfg_cutoff=0.3))
    a, c, e, f = rows
    assert (a.negative_prompt, a.seed, a.steps, a.width, a.height, a.guidance_scale, a.cfg_cutoff, a.scheduler, a.karras) == (
        "b", 7, 4, 32, 48, 3.5, 0.5, "euler", True)
    assert (c.negative_prompt, c.width, c.height, c.guidance_scale, c.cfg_cutoff, c.cfg_cutoff_step, c.steps) == (
        "d", 40, 24, 2.0, None, 1, 9)  # the row's own cutoff step replaces the default ratio
    assert (e.guidance_interval, e.steps, e.cfg_cutoff) == ((0.2, 0.8), 5, None)
    assert f.guidance_interval == (0.1, 0.9)
    assert [r.seed for r in rows] == [7, 1, 2, 3]  # a row without a seed: --seed + its row number


def test_csv_rows_with_header_empty_cells_and_quoted_newlines(tmp_path):
    text = 'prompt,seed,steps,negative\n"a red, circle",5,,\n"two\nlines",,3,no blue\n\n'
    rows, _ = read_rows(write(tmp_path / "p.csv", text), BatchDefaults(steps=2))
    assert [(r.line, r.prompt, r.seed, r.steps, r.negative_prompt) for r in rows] == [
        (2, "a red, circle", 5, 2, None), (3, "two\nlines", 1, 3, "no blue")]


@pytest.mark.parametrize(("fmt", "text", "line", "words"), [
    ("jsonl", '{"prompt": "a"}\n{"prompt": "b", "seed": -1}\n', 2, ["seed", "[0, 2**64-1]", "-1"]),
    ("jsonl", '{"prompt": "a", "steps": 0}\n', 1, ["steps", "[1, 10000]", "got 0"]),
    ("jsonl", '{"prompt": "a", "steps": "many"}\n', 1, ["steps", "whole number", "'many'"]),
    ("jsonl", '{"prompt": "a", "steps": 2.5}\n', 1, ["steps", "whole number", "2.5"]),
    ("jsonl", '{"prompt": "a", "guidance": 1000}\n', 1, ["guidance_scale", "[0, 100]", "1000"]),
    ("jsonl", '{"prompt": "a", "guidance": NaN}\n', 1, ["guidance_scale", "NaN"]),
    ("jsonl", '{"prompt": "a", "colour": "red"}\n', 1, ["unknown field", "'colour'", "prompt, negative_prompt"]),
    ("jsonl", '{"seed": 3}\n', 1, ["has no prompt"]),
    ("jsonl", '{"prompt": "  "}\n', 1, ["prompt must be a non-empty string"]),
    ("jsonl", '{"prompt": 5}\n', 1, ["prompt must be a non-empty string", "5"]),
    ("jsonl", '\n\n{"prompt": "a",}\n', 3, ["not valid JSON", "column"]),
    ("jsonl", '"just a string"\n', 1, ["JSON object", "just a string"]),
    ("jsonl", '{"prompt": "a", "size": "64"}\n', 1, ["WIDTHxHEIGHT", "'64'"]),
    ("jsonl", '{"prompt": "a", "size": "64x64", "width": 32}\n', 1, ["size or width/height"]),
    ("jsonl", '{"prompt": "a", "cfg_cutoff": 0.5, "guidance_interval": "0,1"}\n', 1, ["one of cfg_cutoff", "guidance_interval"]),
    ("jsonl", '{"prompt": "a", "cfg_cutoff": 1.5}\n', 1, ["cfg_cutoff", "[0, 1]", "1.5"]),
    ("jsonl", '{"prompt": "a", "guidance_interval": "0.8,0.2"}\n', 1, ["START <= END", "0.8,0.2"]),
    ("jsonl", '{"prompt": "a", "guidance_interval": [0.1]}\n', 1, ["two ratios", "[0.1]"]),
    ("jsonl", '{"prompt": "a", "scheduler": "fastest"}\n', 1, ["unknown scheduler 'fastest'", "euler"]),
    ("jsonl", '{"prompt": "a", "karras": "maybe"}\n', 1, ["karras must be true or false", "maybe"]),
    ("jsonl", '{"prompt": "a", "negative": "b", "negative_prompt": "c"}\n', 1, ["given twice"]),
    ("jsonl", '{"prompt": "a", "cache": "nope:3"}\n', 1, ["cache: 'nope:3' is not a policy", "deepcache:INTERVAL"]),
    ("jsonl", '{"prompt": "a", "cache": 3}\n', 1, ["cache must be a spec string", "3"]),
    ("jsonl", '{"prompt": "a", "cache": "tgate:0"}\n', 1, ["cache: 'tgate:0'", "gate_step must be an int >= 1"]),
    ("jsonl", '{"prompt": "a", "cache": "fbc:0.1,tgate:3"}\n', 1, ["cache: FirstBlockCacheCallback and TGateCallback both cache"]),
    ("jsonl", '{"prompt": "a", "fast": "maybe"}\n', 1, ["fast must be true or false", "maybe"]),
    ("jsonl", '{"prompt": "a", "fast": true, "cache": "deepcache:3"}\n', 1, ["give cache or fast, not both"]),
    ("csv", "prompt,cache\na,deepcache:x\n", 2, ["cache: 'deepcache:x'"]),
    ("csv", "prompt,colour\na,red\n", 1, ["unknown column 'colour'", "prompt"]),
    ("csv", "prompt,seed\na,1\nb,2,3\n", 3, ["3 cells", "2 columns"]),
    ("csv", "prompt,seed\na,x1\n", 2, ["seed", "whole number", "'x1'"]),
    # issue 24: duplicates were merged (the last won), bad quoting was guessed at
    ("jsonl", '{"prompt": "a", "seed": 1, "seed": 2}\n', 1, ["key 'seed' is given twice"]),
    ("jsonl", '{"prompt": "a", "guidance_interval": {"x": 1, "x": 2}}\n', 1, ["key 'x' is given twice"]),
    ("csv", "prompt,seed,seed\na,1,2\n", 1, ["column 'seed' twice"]),
    ("csv", "prompt,negative,negative_prompt\na,b,\n", 1, ["'negative' and 'negative_prompt' (both negative_prompt)"]),
    ("csv", 'prompt,seed\n"a" circle,1\n', 2, ["not valid CSV", 'write a quote as ""']),
    ("csv", 'prompt\n"a red circle\nb\nc\n', 2, ["never closed", "lines 2-4", "rows in it lost"]),
    ("csv", 'prompt,seed\n"a red\nb,2\n"c",3\n', 2, ["row starting on line 2 runs to line 4"]),
    ("csv", '"prompt,seed\na,1\n', 1, ["never closed"]),
    ("csv", "prompt;seed\na;1\n", 1, ["unknown column 'prompt;seed' (the columns of a CSV file are separated by commas"]),
    ("csv", "prompt,seed,\na,1,\n", 1, ["unknown column '' (an empty column name: a comma too many"]),
])
def test_bad_rows_name_the_line_the_field_the_value_and_what_is_allowed(fmt, text, line, words):
    with pytest.raises(RowError) as info:
        parse_rows(text, fmt, source="in.x")
    assert info.value.line == line
    assert str(info.value).startswith(f"in.x line {line}: ")
    for word in words:
        assert word in str(info.value)


def test_cache_and_fast_fields_and_their_defaults():
    text = "\n".join(json.dumps(x) for x in [
        {"prompt": "a"},  # the defaults' caching
        {"prompt": "b", "cache": " DeepCache : 2 , TGATE:3"},  # normalized
        {"prompt": "c", "fast": True},  # replaces the default spec
        {"prompt": "d", "cache": None},  # no caching, whatever the default
        {"prompt": "e", "fast": False},
    ]) + "\n"
    rows, _ = parse_rows(text, "jsonl", BatchDefaults(cache="tgate:1"))
    assert [(r.cache, r.fast) for r in rows] == [("tgate:1", False), ("deepcache:2,tgate:3", False), (None, True),
                                                 (None, False), (None, False)]
    rows, _ = parse_rows('prompt,fast,cache\na,yes,\nb,,fbc:0.1\nc,,\n', "csv", BatchDefaults(fast=True))
    assert [(r.cache, r.fast) for r in rows] == [(None, True), ("fbc:0.1", False), (None, True)]
    assert len({r.group() for r in rows}) == 2  # rows with other caching never share a pipeline call


def test_rows_with_unet_caching_are_refused_for_a_model_without_a_unet(sd3_folder):
    rows, _ = parse_rows('{"prompt": "a", "fast": true}\n{"prompt": "b", "cache": "fbc:0.1"}\n'
                         '{"prompt": "c", "cache": "adaptive:0.9,tgate:2"}\n', "jsonl", source="in")
    good, errors = check_rows(rows, sd3_folder, "float32", strict=False, source="in")
    assert [r.prompt for r in good] == ["b"]
    assert [e.line for e in errors] == [1, 3]
    assert str(errors[0]).startswith("in line 1: fast: DeepCacheCallback caches a UNet's blocks")
    assert str(errors[1]).startswith("in line 3: cache: TGateCallback caches a UNet's blocks")


def test_without_strict_bad_rows_are_reported_and_the_rest_kept():
    rows, errors = parse_rows('{"prompt": "a"}\n{"prompt": "b", "seed": -1}\nnope\n{"prompt": "c"}\n', "jsonl",
                              source="in", strict=False)
    assert [r.prompt for r in rows] == ["a", "c"]
    assert [e.line for e in errors] == [2, 3]
    assert [r.seed for r in rows] == [0, 3]  # a bad row still has its row number: seeds don't shift


# The characters str.splitlines() breaks at besides \n, \r and \r\n: legal inside a JSON string and a prompt.
_NOT_LINE_BREAKS = ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e"]


@pytest.mark.parametrize("char", _NOT_LINE_BREAKS, ids=[f"U+{ord(c):04X}" for c in _NOT_LINE_BREAKS])
def test_only_newlines_end_a_row(char):
    """Issue 24: input was split with str.splitlines(): valid JSONL rows refused, one prompt made two, lines shifted."""
    prompt = f"a red{char}circle"
    jsonl = f'{{"prompt": "{prompt}", "seed": 1}}\n{{"prompt": "b"}}\n'  # raw, as an editor saves it
    text = f"{prompt}\nb\n"
    csv_text = f"prompt,seed\n{prompt},1\nb,\n"
    for fmt, source, lines in (("jsonl", jsonl, [1, 2]), ("text", text, [1, 2]), ("csv", csv_text, [2, 3])):
        rows, errors = parse_rows(source, fmt, source="in", strict=False)
        assert errors == [], (fmt, errors)
        assert [(r.line, r.prompt) for r in rows] == [(lines[0], prompt), (lines[1], "b")], fmt
    # \r\n and a lone \r still end lines, as in the csv module and Python's text files
    rows, _ = parse_rows('{"prompt": "a"}\r\n{"prompt": "b"}\r{"prompt": "c"}\n', "jsonl")
    assert [(r.line, r.prompt) for r in rows] == [(1, "a"), (2, "b"), (3, "c")]


@pytest.mark.parametrize(("fmt", "row", "words"), [
    ("jsonl", '{"prompt": "a", "guidance": %s}' % 10**400, ["guidance_scale must be a number in [0, 100]", "..."]),
    ("jsonl", '{"prompt": "a", "cfg_cutoff": -%s}' % 10**400, ["cfg_cutoff must be a number in [0, 1]"]),
    ("jsonl", '{"prompt": "a", "guidance_interval": [%s, 1]}' % 10**400, ["guidance_interval[0] must be a number in [0, 1]"]),
    ("jsonl", '{"prompt": "a", "steps": %s}' % 10**400, ["steps must be in [1, 10000]", "..."]),
    ("jsonl", '{"prompt": "a", "width": %s}' % 10**400, ["width must be in [8, 65536]", "..."]),
    ("jsonl", '{"prompt": "a", "seed": %s}' % ("9" * 5000), ["not valid JSON here (a number of more than 4300 digits)"]),
    ("jsonl", '{"prompt": "a", "size": "%sx64"}' % ("9" * 5000), ["size '999", "far beyond any size"]),
    ("jsonl", "[" * 100_000, ["not valid JSON (arrays or objects nested too deeply)"]),
    ("csv", "a,%s," % ("9" * 5000), ["seed must be in [0, 2**64-1], got '999", "..."]),
    ("csv", "a,1,%s" % ("9" * 5000), ["guidance_scale must be a number in [0, 100]", "..."]),
], ids=["guidance", "cfg_cutoff", "interval", "steps", "width", "seed-digits", "size-digits", "nesting", "csv-seed",
        "csv-guidance"])
def test_a_number_too_big_for_python_is_a_row_error_not_the_end_of_the_batch(fmt, row, words):
    """Issue 24: 10**400 in a row ended the whole batch (OverflowError, exit 1, no image)."""
    text = row + "\n" + ('{"prompt": "b"}\n' if fmt == "jsonl" else "b,,\n")
    if fmt == "csv":
        text = "prompt,seed,guidance\n" + text
    rows, errors = parse_rows(text, fmt, source="in", strict=False)
    assert [r.prompt for r in rows] == ["b"]
    (error,) = errors
    assert error.line == (2 if fmt == "csv" else 1)
    for word in words:
        assert word in str(error)
    assert len(str(error)) < 200  # the value is shortened, not printed in full


def test_whole_numbers_read_as_before():
    """The digit-count guard above keeps what int() reads: full-width digits (as --size takes them), underscores."""
    rows, _ = parse_rows('{"prompt": "a", "seed": "\uff17", "size": "\uff16\uff14x64"}\n{"prompt": "b", "seed": '
                         '" 1_000 ", "steps": "+3"}\n', "jsonl")
    assert [(r.seed, r.width, r.height, r.steps) for r in rows] == [(7, 64, 64, 25), (1000, None, None, 3)]


def test_csv_bad_quotes_in_one_line_lose_only_that_row(tmp_path):
    """Issue 24: the csv module's default quoting took '"b"x' as 'bx'; a csv.Error ended reading, losing every row after it."""
    text = 'prompt,seed\na,1\n"b"x,2\n' + "x" * 140_000 + ',3\n"d",4\n'
    rows, errors = read_rows(write(tmp_path / "p.csv", text), strict=False)
    assert [(r.line, r.prompt, r.seed) for r in rows] == [(2, "a", 1), (5, "d", 4)]
    assert [e.line for e in errors] == [3, 4]
    assert "',' expected after '\"'" in str(errors[0])
    assert "a cell is longer than 131072 characters" in str(errors[1])


def test_cli_a_csv_quote_never_closed_exits_2_before_any_work(tmp_path, sd_folder, run_cli, monkeypatch):
    """Issue 24: three rows, one image, exit 0."""
    path = write(tmp_path / "p.csv", 'prompt\n"a red circle\na blue square\na green triangle\n')
    monkeypatch.setattr("stepdiff.batch.runner._run_embedded", lambda *a: pytest.fail("no work for a broken file"))
    code, _, err = run_cli("batch", path, "--out", tmp_path / "out", "--model", sd_folder)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{path} line 2: not valid CSV: a quoted cell opened on line 2 is never closed" in err
    assert not (tmp_path / "out").exists()


def test_cli_a_huge_number_skips_its_row_and_makes_the_others(tmp_path, sd_folder, run_cli):
    path = write(tmp_path / "p.jsonl", '{"prompt": "a", "guidance": %s}\n{"prompt": "b"}\n' % 10**400)
    code, stdout, err = run_cli("batch", path, "--out", tmp_path / "out", "--model", sd_folder, "--steps", 1)
    assert code == 0, err
    assert "1 image(s) made" in stdout and "1 bad row(s) skipped" in stdout
    assert f"{path} line 1: guidance_scale must be a number" in err


@pytest.mark.parametrize(("name", "text", "words"), [
    ("p.doc", "a\n", ["can't tell its format", ".jsonl", "--format"]),
    ("p.txt", "\n# only comments\n", ["no rows"]),
])
def test_bad_input_files(tmp_path, name, text, words):
    with pytest.raises(ValueError) as info:
        read_rows(write(tmp_path / name, text))
    for word in words:
        assert word in str(info.value)


def test_input_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(ValueError, match="line 3: not UTF-8"):
        read_rows(path)


def test_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_rows(tmp_path / "nope.txt")


def test_rows_checked_against_the_model(sd_folder):
    rows, _ = parse_rows('{"prompt": "a"}\n{"prompt": "b", "width": 36}\n{"prompt": "c", "steps": 5000, "scheduler": "ddim"}\n'
                         '{"prompt": "d", "width": 1024}\n{"prompt": "e", "scheduler": "ddim", "karras": true}\n', "jsonl",
                         source="in")
    good, errors = check_rows(rows, sd_folder, "float32", strict=False, source="in")
    assert [r.prompt for r in good] == ["a"]
    assert good[0].width == good[0].height == 32 and good[0].scheduler and good[0].guidance_scale == 7.5  # model defaults
    messages = [str(e) for e in errors]
    assert "in line 2: width must be a positive multiple of 8" in messages[0] and "got 36" in messages[0]
    assert "in line 3: steps must be in [1, 1000] with scheduler 'ddim'" in messages[1] and "got 5000" in messages[1]
    assert "in line 4: width 1024 is more than 8 times" in messages[2]
    assert "in line 5: scheduler 'ddim' has no Karras sigmas" in messages[3]
    with pytest.raises(RowError, match="line 2"):
        check_rows(rows, sd_folder, "float32", strict=True, source="in")


# ------------------------------------------------------------------------------------------- keys


def test_the_key_hashes_the_parameters_and_the_model_not_the_place(tmp_path, sd_folder):
    base, _ = parse_rows('{"prompt": "a", "seed": 1}\n', "jsonl")
    (row,) = check_rows(base, sd_folder, "float32", True)[0]
    moved = check_rows([replace(base[0], line=40, index=9)], sd_folder, "float32", True)[0][0]
    assert moved.key == row.key
    for change in ({"prompt": "b"}, {"seed": 2}, {"steps": 3}, {"negative_prompt": "x"}, {"guidance_scale": 2.0},
                   {"cfg_cutoff": 0.5}, {"guidance_interval": (0.1, 0.5)}, {"scheduler": "euler"}, {"width": 40},
                   {"cache": "deepcache:3"}, {"fast": True}):
        changed = check_rows([replace(base[0], **change)], sd_folder, "float32", True)[0][0]
        assert changed.key != row.key, change
    assert check_rows(base, sd_folder, "float16", True)[0][0].key != row.key
    other = tmp_path / "other"
    import shutil

    shutil.copytree(sd_folder, other)
    assert check_rows(base, other, "float32", True)[0][0].key == row.key  # the same model elsewhere: same key
    weights = next(p for p in other.rglob("unet/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_identity(other) != model_identity(sd_folder)
    assert check_rows(base, other, "float32", True)[0][0].key != row.key


# ------------------------------------------------------------------------------------------- manifest


def test_manifest_ignores_a_torn_last_line_and_cuts_it_before_appending(tmp_path):
    m = Manifest(tmp_path)
    with m:
        m.append({"key": "a", "n": 1})
        m.append({"key": "b", "n": 2})
    with open(m.path, "ab") as f:
        f.write(b'{"key": "c", "n"')  # a crash in the middle of an append
    assert [e["key"] for e in m.read()] == ["a", "b"]
    with Manifest(tmp_path) as again:
        assert again.torn == len(b'{"key": "c", "n"')
        again.append({"key": "d"})
    assert [e["key"] for e in Manifest(tmp_path).read()] == ["a", "b", "d"]
    assert m.path.read_bytes().endswith(b"\n")


def test_manifest_refuses_a_corrupt_middle_line_naming_it(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"key": "a"}\nGARBAGE\n{"key": "b"}\n')
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        Manifest(tmp_path).read()
    (tmp_path / "manifest.jsonl").write_text('{"key": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 2 is not a stepdiff entry"):
        Manifest(tmp_path).read()


def test_latest_entry_of_a_key_wins(tmp_path):
    with Manifest(tmp_path) as m:
        m.append({"key": "a", "v": 1})
        m.append({"key": "a", "v": 2})
    assert Manifest(tmp_path).latest()["a"]["v"] == 2


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, sd_folder):
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.txt", "a red circle\n"))
    cfg.out.mkdir()
    with folder_lock(cfg.out), pytest.raises(OSError, match="in use by another stepdiff batch run"):
        run_batch(cfg)


# ------------------------------------------------------------------------------------------- runs


def test_embedded_run_writes_one_image_per_row_with_metadata_and_manifest(tmp_path, sd_folder):
    text = "\n".join(json.dumps({"prompt": p, "seed": i}) for i, p in enumerate(PROMPTS[:3])) + "\n"
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.jsonl", text))
    result = run_batch(cfg)
    assert (result.made, result.skipped, result.failed, result.bad) == (3, 0, [], [])
    entries = Manifest(cfg.out).read()
    assert [e["line"] for e in entries] == [1, 2, 3]
    for e, prompt in zip(entries, PROMPTS):
        path = cfg.out / e["file"]
        assert path.is_file() and path.stat().st_size == e["bytes"]
        assert e["prompt"] == prompt and e["worker"].startswith("embedded:") and e["batch_rows"] == 1
        assert e["record"]["steps_completed"] == 2 and e["record"]["stop_reason"] == "completed"
        assert e["record"]["model_rows"] == 4 and e["record"]["wall_seconds"] > 0
        meta = stepdiff_chunk(path)
        assert (meta["key"], meta["prompt"], meta["seed"], meta["steps"]) == (e["key"], prompt, e["seed"], 2)
        with Image.open(path) as im:
            assert im.info["parameters"].startswith(prompt) and "Seed: " in im.info["parameters"]
    assert sorted(p.name for p in cfg.out.iterdir()) == sorted([e["file"] for e in entries] +
                                                                ["manifest.jsonl", ".stepdiff-batch.lock"])


def test_an_image_file_is_a_function_of_its_row_and_the_model(tmp_path, sd_folder, monkeypatch):
    """Issue 24: the PNG carried the wall time and the worker, so a redone or Ray-made image had other bytes."""
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.txt", "a red circle\na blue square\n"))
    assert run_batch(cfg).made == 2
    first = Manifest(cfg.out).read()
    made = {e["key"]: (cfg.out / e["file"]).read_bytes() for e in first}
    (cfg.out / first[0]["file"]).unlink()  # redone by the resume, by another worker
    monkeypatch.setattr("stepdiff.batch.worker.embedded_label", lambda: "embedded:elsewhere:1")
    assert run_batch(cfg).made == 1
    assert run_batch(replace(cfg, out=tmp_path / "other")).made == 2
    again = Manifest(cfg.out).read()[2:] + Manifest(tmp_path / "other").read()
    for e in again:
        folder = cfg.out if e in Manifest(cfg.out).read() else tmp_path / "other"
        assert (folder / e["file"]).read_bytes() == made[e["key"]], e["prompt"]
        assert e["sha256"] == next(f["sha256"] for f in first if f["key"] == e["key"])
        # who made it and how long it took: in the manifest, not in the image
        assert e["worker"] == "embedded:elsewhere:1" and e["record"]["wall_seconds"] > 0
        meta = stepdiff_chunk(folder / e["file"])
        assert "worker" not in meta and "wall_seconds" not in meta["record"]
        assert meta["record"]["model_calls"] == e["record"]["model_calls"]


def test_a_row_is_the_same_image_as_generate_makes(tmp_path, sd_folder, run_cli, monkeypatch):
    """Same prompt, seed, steps, guidance, cutoff: the batch image has generate's pixels (same thread count)."""
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.jsonl", '{"prompt": "a red circle", "seed": 5, "cfg_cutoff": 0.5}\n'),
                 threads=torch.get_num_threads())
    run_batch(cfg)
    (entry,) = Manifest(cfg.out).read()
    code, _, err = run_cli("generate", "a red circle", "--model", sd_folder, "--seed", 5, "--steps", 2,
                           "--cfg-cutoff", 0.5, "--output", tmp_path / "g.png")
    assert code == 0, err
    assert pixels(cfg.out / entry["file"]) == pixels(tmp_path / "g.png")
    batch_meta, gen_meta = stepdiff_chunk(cfg.out / entry["file"]), stepdiff_chunk(tmp_path / "g.png")
    for name in ("prompt", "seed", "steps", "guidance_scale", "scheduler", "cfg_cutoff_ratio", "model"):
        assert batch_meta[name] == gen_meta[name], name


def test_resume_skips_done_rows_and_redoes_changed_and_missing_ones(tmp_path, sd_folder):
    path = write(tmp_path / "p.txt", "\n".join(PROMPTS[:4]) + "\n")
    cfg = config(tmp_path, sd_folder, path)
    run_batch(cfg)
    before = {e["file"]: (cfg.out / e["file"]).stat().st_mtime_ns for e in Manifest(cfg.out).read()}
    again = run_batch(cfg)
    assert (again.made, again.skipped) == (0, 4)
    assert {f: (cfg.out / f).stat().st_mtime_ns for f in before} == before  # nothing rewritten
    assert len(Manifest(cfg.out).read()) == 4

    write(path, "\n".join([PROMPTS[0], "a purple circle", *PROMPTS[2:4]]) + "\n")  # row 2 changed
    (cfg.out / next(iter(before))).unlink()  # row 1's image lost
    third = run_batch(cfg)
    assert (third.made, third.skipped) == (2, 2)
    assert all((cfg.out / f).exists() for f in list(before)[1:])  # the old row 2's image is kept, not lost
    latest = Manifest(cfg.out).latest()
    assert {e["prompt"] for e in latest.values()} >= {PROMPTS[0], "a purple circle", *PROMPTS[2:4]}


def test_verify_catches_an_image_changed_in_place(tmp_path, sd_folder):
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.txt", "a red circle\n"))
    run_batch(cfg)
    (entry,) = Manifest(cfg.out).read()
    image = cfg.out / entry["file"]
    good = image.read_bytes()
    data = bytearray(good)
    data[-20] ^= 0xFF  # same size, other bytes
    image.write_bytes(bytes(data))
    assert run_batch(cfg).made == 0  # the size matches: by default that is enough
    cfg.verify = True
    assert run_batch(cfg).made == 1
    assert pixels(image) == Image.open(__import__("io").BytesIO(good)).tobytes()


def test_a_torn_manifest_line_redoes_only_that_image(tmp_path, sd_folder):
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.txt", "\n".join(PROMPTS[:3]) + "\n"))
    run_batch(cfg)
    data = cfg.out.joinpath("manifest.jsonl").read_bytes()
    cfg.out.joinpath("manifest.jsonl").write_bytes(data[:-30])  # the last entry torn by a crash
    result = run_batch(cfg)
    assert (result.made, result.skipped) == (1, 2)
    assert len(Manifest(cfg.out).read()) == 3


def test_batched_rows_keep_their_own_seeds_and_prompts(tmp_path, sd_folder):
    """batch_size 2: each image is its row's (within the last bit of a batched call), never its neighbour's."""
    text = "\n".join(json.dumps({"prompt": p, "seed": 3 * i, "negative": "blue" if i % 2 else None})
                     for i, p in enumerate(PROMPTS[:4])) + "\n"
    single = config(tmp_path, sd_folder, write(tmp_path / "p.jsonl", text))
    batched = replace(single, out=tmp_path / "batched", batch_size=2)
    run_batch(single)
    result = run_batch(batched)
    assert result.made == 4
    entries = Manifest(batched.out).read()
    assert [e["batch_rows"] for e in entries] == [2, 2, 2, 2]
    assert entries[0]["record"]["rows_per_step"] == [4, 4]
    for e in entries:
        a = np.asarray(Image.open(single.out / e["file"])).astype(int)
        b = np.asarray(Image.open(batched.out / e["file"])).astype(int)
        assert np.abs(a - b).max() <= 2, e["prompt"]
    other = [np.asarray(Image.open(single.out / e["file"])).astype(int) for e in entries]
    assert np.abs(other[0] - other[1]).max() > 10  # rows really differ: the check above can fail


def test_rows_with_different_settings_never_share_a_call(tmp_path, sd_folder):
    lines = [{"prompt": "a"}, {"prompt": "b", "steps": 3}, {"prompt": "c"}, {"prompt": "d", "steps": 3},
             {"prompt": "e", "guidance_interval": "0,0.5"}, {"prompt": "f"}]
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n"),
                 batch_size=2)
    plan = plan_batch(cfg)
    assert [[r.prompt for r in c.rows] for c in plan.chunks] == [["a", "c"], ["b", "d"], ["e"], ["f"]]
    result = run_batch(cfg)
    assert result.made == 6
    by_prompt = {e["prompt"]: e for e in Manifest(cfg.out).read()}
    assert by_prompt["b"]["record"]["steps_completed"] == 3
    assert by_prompt["e"]["record"]["rows_per_step"] == [2, 1]  # guidance only in [0, 0.5) of 2 steps


def test_cache_and_fast_rows_reach_their_runs_and_the_manifest_records_them(tmp_path, sd_folder):
    from stepdiff.caching import describe, fast_preset, parse_cache_spec

    lines = [{"prompt": "a", "cache": "deepcache:2"}, {"prompt": "b", "fast": True}, {"prompt": "c"},
             {"prompt": "d", "cache": "nope"}]
    seen = []
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n"),
                 defaults=BatchDefaults(steps=4))
    result = run_batch(cfg, on_event=seen.append)
    assert result.made == 3 and [e.line for e in result.bad] == [4]  # a bad spec is a row error, not an abort
    assert seen[0].startswith(f"{cfg.input} line 4: cache: 'nope' is not a policy")
    by_prompt = {e["prompt"]: e for e in Manifest(cfg.out).read()}
    a, b, c = by_prompt["a"], by_prompt["b"], by_prompt["c"]
    assert (a["cache"], a["fast"], a["cache_policies"]) == ("deepcache:2", False, describe(parse_cache_spec("deepcache:2")))
    assert (b["cache"], b["fast"], b["cache_policies"]) == (None, True, describe(fast_preset(4)))
    assert (c["cache"], c["fast"], c["cache_policies"]) == (None, False, None)
    assert a["record"]["cached_calls"] == 2 and a["record"]["rows_per_step"] == [2, 2, 2, 2]
    assert b["record"]["cached_calls"] > 0 and b["record"]["rows_per_step"] == [2, 2, 1, 1]  # T-GATE's gate: step 2
    assert c["record"]["cached_calls"] == 0
    assert stepdiff_chunk(cfg.out / b["file"])["cache"] == b["cache_policies"]
    assert stepdiff_chunk(cfg.out / c["file"])["cache"] is None


def test_a_crash_loses_only_the_chunk_in_flight_and_resume_gives_the_same_images(tmp_path, sd_folder, monkeypatch):
    text = "\n".join(json.dumps({"prompt": p, "seed": i}) for i, p in enumerate(PROMPTS)) + "\n"
    reference = config(tmp_path, sd_folder, write(tmp_path / "p.jsonl", text), batch_size=2)
    reference.out = tmp_path / "reference"
    run_batch(reference)
    cfg = replace(reference, out=tmp_path / "out")

    real_run = ChunkWorker.run
    calls = []

    def crash_on_third_chunk(self, rows, todo=None):
        calls.append(len(rows))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C twice, or a kill: mid-chunk
        return real_run(self, rows, todo)

    monkeypatch.setattr(ChunkWorker, "run", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt) as info:
        run_batch(cfg)
    assert "kept the 4 image(s) made in this run" in info.value.stepdiff_kept
    assert len(Manifest(cfg.out).read()) == 4  # two whole chunks of 2
    monkeypatch.setattr(ChunkWorker, "run", real_run)
    resumed = run_batch(cfg)
    assert (resumed.made, resumed.skipped) == (1, 4)
    for e in Manifest(reference.out).read():
        assert pixels(cfg.out / e["file"]) == pixels(reference.out / e["file"])


def test_resume_of_a_part_done_chunk_runs_it_whole_and_writes_only_the_missing_row(tmp_path, sd_folder):
    text = "\n".join(json.dumps({"prompt": p, "seed": i}) for i, p in enumerate(PROMPTS[:2])) + "\n"
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.jsonl", text), batch_size=2)
    run_batch(cfg)
    first, second = Manifest(cfg.out).read()
    expected = pixels(cfg.out / second["file"])
    (cfg.out / second["file"]).unlink()
    mtime = (cfg.out / first["file"]).stat().st_mtime_ns
    result = run_batch(cfg)
    assert (result.made, result.skipped) == (1, 1)
    assert (cfg.out / first["file"]).stat().st_mtime_ns == mtime
    assert pixels(cfg.out / second["file"]) == expected  # bit for bit: computed in the same 2-row call
    assert Manifest(cfg.out).read()[-1]["batch_rows"] == 2


def test_stop_finishes_the_chunk_in_flight_and_says_so(tmp_path, sd_folder):
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.txt", "\n".join(PROMPTS) + "\n"), batch_size=2)
    stop = threading.Event()
    seen = []

    def on_event(line):
        seen.append(line)

    real_run = ChunkWorker.run

    def run_then_stop(self, rows, todo=None):
        out = real_run(self, rows, todo)
        stop.set()  # Ctrl-C during the first chunk
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ChunkWorker, "run", run_then_stop)
        result = run_batch(cfg, stop=stop, on_event=on_event)
    assert result.stopped and result.made == 2
    assert "run the same command again to resume" in result.summary()
    assert len(Manifest(cfg.out).read()) == 2


def test_duplicate_rows_make_one_image_and_are_reported(tmp_path, sd_folder):
    seen = []
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.jsonl", '{"prompt": "a", "seed": 1}\n{"prompt": "b"}\n'
                                                                  '{"prompt": "a", "seed": 1}\n'))
    result = run_batch(cfg, on_event=seen.append)
    assert result.made == 2 and result.duplicates == [(3, 1)]
    assert any("line 3 repeats line 1" in s for s in seen)


def test_strict_fails_a_bad_row_before_any_work(tmp_path, sd_folder, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(ChunkWorker, "__init__", no_loading)
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "steps": -2}\n'),
                 strict=True)
    with pytest.raises(RowError, match="line 2: steps must be in"):
        run_batch(cfg)
    assert not cfg.out.exists()


def test_without_strict_a_bad_row_is_reported_and_the_rest_run(tmp_path, sd_folder):
    seen = []
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "steps": -2}\n'
                                                                  '{"prompt": "c", "width": 33}\n{"prompt": "d"}\n'))
    result = run_batch(cfg, on_event=seen.append)
    assert result.made == 2 and [e.line for e in result.bad] == [2, 3]
    assert [s.split(":")[0] for s in seen] == [f"{cfg.input} line 2", f"{cfg.input} line 3"]
    assert "2 bad row(s) skipped" in result.summary()


def test_a_failing_call_fails_its_rows_only_unless_strict(tmp_path, sd_folder, monkeypatch):
    from stepdiff.pipelines.stable_diffusion import StableDiffusionPipeline

    real_steps = StableDiffusionPipeline.steps  # the batch worker's call: steps(..., scheduler=).run()

    def nan_for_b(self, prompt=None, **kw):
        if "b" in prompt:
            raise FloatingPointError("the latents became NaN at step 1")
        return real_steps(self, prompt=prompt, **kw)

    monkeypatch.setattr(StableDiffusionPipeline, "steps", nan_for_b)
    path = write(tmp_path / "p.txt", "a\nb\nc\n")
    result = run_batch(config(tmp_path, sd_folder, path))
    assert result.made == 2 and result.failed == [(2, "FloatingPointError: the latents became NaN at step 1")]
    assert {e["prompt"] for e in Manifest(tmp_path / "out").read()} == {"a", "c"}
    with pytest.raises(RowFailed, match="line 2: FloatingPointError"):
        run_batch(replace(config(tmp_path, sd_folder, path), strict=True, out=tmp_path / "strict"))


@pytest.mark.parametrize(("change", "words"), [
    ({"batch_size": 0}, ["--batch-size", "[1, 4096]", "0"]),
    ({"threads": 0}, ["--threads", "[1, 1024]"]),
    ({"ray": True, "gpus_per_worker": float("nan")}, ["--gpus-per-worker", "[0, 64]", "nan"]),
    ({"ray": True, "gpus_per_worker": -1.0}, ["--gpus-per-worker", "-1.0"]),
    ({"workers": 2}, ["--workers needs --ray"]),
    ({"gpus_per_worker": 1.0}, ["--gpus-per-worker needs --ray"]),
    ({"ray": True, "ray_address": "auto"}, ["--ray", "--ray-address", "not both"]),
])
def test_bad_run_settings(tmp_path, sd_folder, change, words):
    cfg = replace(config(tmp_path, sd_folder, write(tmp_path / "p.txt", "a\n")), **change)
    with pytest.raises(ValueError) as info:
        run_batch(cfg)
    for word in words:
        assert word in str(info.value)


def test_out_that_is_a_file(tmp_path, sd_folder):
    cfg = config(tmp_path, sd_folder, write(tmp_path / "p.txt", "a\n"))
    cfg.out.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        run_batch(cfg)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_batch_run_and_resume(tmp_path, sd_folder, run_cli):
    path = write(tmp_path / "p.csv", "prompt,seed\na red circle,1\na blue square,2\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli("batch", path, "--out", out, "--model", sd_folder, "--steps", 2, "--batch-size", 2,
                                "--guidance-interval", "0.5,1")
    assert code == 0, err
    assert "2 image(s) made, 0 already done" in stdout
    entries = Manifest(out).read()
    assert [e["guidance_interval"] for e in entries] == [[0.5, 1.0]] * 2
    assert entries[0]["record"]["rows_per_step"] == [2, 4]
    code, stdout, _ = run_cli("batch", path, "--out", out, "--model", sd_folder, "--steps", 2, "--batch-size", 2,
                              "--guidance-interval", "0.5,1")
    assert code == 0 and "0 image(s) made, 2 already done" in stdout


@pytest.mark.parametrize(("flags", "words"), [
    (["--workers", "2"], ["--workers needs --ray"]),
    (["--batch-size", "0"], ["--batch-size must be in [1, 4096], got 0"]),
    (["--gpus-per-worker", "nan", "--ray"], ["--gpus-per-worker must be a number in [0, 64], got nan"]),
    (["--guidance-interval", "0.9,0.1"], ["--guidance-interval must be START,END", "0.9,0.1"]),
    (["--guidance", "500"], ["--guidance must be a number in [0, 100]", "500"]),
    (["--seed", "-4"], ["--seed must be in [0,"]),
    (["--steps", "0"], ["--steps must be in [1, 10000], got 0"]),
    (["--scheduler", "nope"], ["--scheduler", "unknown scheduler 'nope'"]),
    (["--format", "xml"], ["--format", "invalid choice: 'xml'"]),
    (["--ray", "--ray-address", "auto"], ["not both"]),
    (["--cfg-cutoff", "0.5", "--guidance-interval", "0,1"], ["not allowed with argument"]),
    (["--cache", "nope"], ["--cache: 'nope' is not a policy", "deepcache:INTERVAL"]),
    (["--cache", "fbc:0.1,deepcache:2"], ["--cache: FirstBlockCacheCallback and DeepCacheCallback both cache"]),
    (["--fast", "--cache", "deepcache:3"], ["argument --cache: not allowed with argument --fast"]),
])
def test_cli_bad_flags_exit_2_naming_them(tmp_path, sd_folder, run_cli, flags, words):
    path = write(tmp_path / "p.txt", "a\n")
    code, _, err = run_cli("batch", path, "--out", tmp_path / "out", "--model", sd_folder, *flags)
    assert code == 2
    for word in words:
        assert word in err
    assert not (tmp_path / "out").exists()


def test_cli_fast_is_the_rows_default(tmp_path, sd_folder, run_cli):
    path = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "cache": "deepcache:2"}\n'
                                       '{"prompt": "c", "fast": false}\n')
    out = tmp_path / "out"
    code, stdout, err = run_cli("batch", path, "--out", out, "--model", sd_folder, "--steps", 4, "--fast")
    assert code == 0, err
    by_prompt = {e["prompt"]: e for e in Manifest(out).read()}
    assert by_prompt["a"]["fast"] is True and by_prompt["a"]["record"]["cached_calls"] > 0
    assert by_prompt["b"]["fast"] is False and by_prompt["b"]["cache"] == "deepcache:2"
    assert by_prompt["c"]["cache_policies"] is None and by_prompt["c"]["record"]["cached_calls"] == 0


def test_cli_strict_bad_row_exits_2_naming_the_line(tmp_path, sd_folder, run_cli):
    path = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "seed": "x"}\n')
    code, _, err = run_cli("batch", path, "--out", tmp_path / "out", "--model", sd_folder, "--strict")
    assert code == 2
    assert f"{path} line 2: seed must be a whole number, got 'x'" in err


def test_cli_without_ray_installed_says_how_to_get_it(tmp_path, sd_folder, run_cli, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code, _, err = run_cli("batch", write(tmp_path / "p.txt", "a\n"), "--out", tmp_path / "out", "--model", sd_folder,
                           "--ray")
    assert code == 2
    assert "pip install 'stepdiff[ray]'" in err
    assert not (tmp_path / "out").exists()


def test_params_names_every_field_of_a_row_but_its_place():
    from dataclasses import fields

    from stepdiff.batch import BatchRow

    row = BatchRow(line=1, index=0, prompt="a", seed=1, steps=2, guidance_interval=(0.1, 0.2), cache="deepcache:3",
                   fast=True)
    assert set(row.params()) == {f.name for f in fields(BatchRow)} - {"line", "index", "key"}
    assert row.params()["guidance_interval"] == [0.1, 0.2]
    # a row without step caching names none: the keys of manifests written before it existed stay the same
    assert set(replace(row, cache=None, fast=False).params()) == set(row.params()) - {"cache", "fast"}
