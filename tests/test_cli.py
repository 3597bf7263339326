"""stepdiff generate: flags, metadata, bad input (exit code + one clear stderr line, no traceback)."""

import json
import os
import stat

import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _in_a_fresh_folder(tmp_path, monkeypatch):
    """A run that succeeds by mistake writes its stepdiff-NNNNN.png here, never into the repository."""
    monkeypatch.chdir(tmp_path)


def test_generate_writes_png_with_metadata(run_cli, sd_folder, tmp_path):
    target = tmp_path / "img.png"
    code, out, err = run_cli("generate", "a photo of a cat", "--model", sd_folder, "--steps", "4", "--seed", "7",
                             "--negative", "a dog", "--scheduler", "euler-a", "--output", target, "--cfg-cutoff", "0.5")
    assert code == 0, err
    assert out.strip() == str(target)
    image = Image.open(target)
    params = image.text["parameters"]
    assert params.startswith("a photo of a cat\nNegative prompt: a dog\nSteps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 7")
    meta = json.loads(image.text["stepdiff"])
    assert meta["prompt"] == "a photo of a cat" and meta["seed"] == 7 and meta["steps"] == 4
    assert meta["scheduler"] == "EulerAncestralDiscreteScheduler" and meta["cfg_cutoff_ratio"] == 0.5
    assert meta["record"]["rows_per_step"] == [2, 2, 2, 1]
    assert "stepdiff_version" in meta and meta["model"] == str(sd_folder)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, no leftovers


def test_several_images_and_no_overwrite(run_cli, sd_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stepdiff-00001.png").write_bytes(b"keep me")
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "2", "--num-images", "2",
                             "--size", "32x48", "--karras", "--scheduler", "dpm++2m")
    assert code == 0, err
    paths = out.split()
    assert [os.path.basename(p) for p in paths] == ["stepdiff-00002.png", "stepdiff-00003.png"]
    assert (tmp_path / "stepdiff-00001.png").read_bytes() == b"keep me"
    assert Image.open(paths[0]).size == (32, 48)
    assert "Sampler: DPM++ 2M Karras" in Image.open(paths[1]).text["parameters"]
    assert "Seed: 1" in Image.open(paths[1]).text["parameters"]


def test_stop_at_marks_interrupted(run_cli, sd_folder, tmp_path):
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "6", "--stop-at", "2",
                             "--output", tmp_path / "a.png", "--verbose")
    assert code == 0, err
    meta = json.loads(Image.open(tmp_path / "a.png").text["stepdiff"])
    assert meta["record"]["interrupted"] is True and meta["record"]["steps_completed"] == 3
    assert "Interrupted at step: 3" in Image.open(tmp_path / "a.png").text["parameters"]
    assert "record:" in err


def test_unknown_words_warning(run_cli, sd_folder, tmp_path):
    code, out, err = run_cli("generate", "a zebra cat", "--model", sd_folder, "--steps", "2", "--output", tmp_path / "z.png")
    assert code == 0
    assert "warning: the model does not know zebra" in err


@pytest.mark.parametrize("args,message", [
    (["--scheduler", "nope"], "unknown scheduler 'nope'; choose one of: ddim"),
    (["--size", "30x32"], "--size width must be a positive multiple of 8, at least 8 for this model, got 30"),
    (["--size", "big"], "--size must look like WIDTHxHEIGHT"),
    (["--steps", "0"], "--steps must be in [1, 10000], got 0"),
    (["--cfg-cutoff", "1.5"], "--cfg-cutoff: must be a number in [0, 1], got '1.5'"),
    (["--output", "/nonexistent-dir/x.png"], "folder '/nonexistent-dir' does not exist"),
    (["--num-images", "0"], "--num-images must be >= 1"),
    (["--guidance", "nan"], "--guidance must be a number in [0, 100], got nan"),
    (["--stop-on-convergence", "-0.1"], "--stop-on-convergence must be a number > 0, got -0.1"),
    (["--stop-on-convergence", "--patience", "0"], "--patience must be >= 1, got 0"),
])
def test_bad_flags(run_cli, sd_folder, args, message):
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_and_non_pipeline_model(run_cli, tmp_path):
    code, _, err = run_cli("generate", "a cat", "--model", tmp_path / "missing")
    assert code == 2 and "is not a folder" in err
    code, _, err = run_cli("generate", "a cat", "--model", tmp_path)
    assert code == 2 and "not a pipeline folder: it has no model_index.json" in err


def test_unwritable_output_folder(run_cli, sd_folder, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    real_access = os.access
    # CI runs as root, for whom permission bits never bind; ask os.access the way a normal user would get it.
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) and mode == os.W_OK else real_access(p, mode))
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--output", locked / "x.png")
    assert code == 2 and "is not writable" in err


def test_output_is_a_folder(run_cli, sd_folder, tmp_path):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--output", tmp_path)
    assert code == 2 and "is a folder" in err


def test_help_lists_flags(run_cli):
    code, out, _ = run_cli("generate", "--help")
    assert code == 0
    for flag in ("--model", "--steps", "--guidance", "--negative", "--seed", "--scheduler", "--karras", "--size",
                 "--num-images", "--output", "--cfg-cutoff", "--cfg-cutoff-step", "--stop-at", "--device", "--dtype"):
        assert flag in out


def test_tiny_model_command(run_cli, tmp_path):
    code, out, _ = run_cli("tiny-model", tmp_path / "t", "--family", "sdxl")
    assert code == 0 and (tmp_path / "t" / "model_index.json").is_file()


def test_written_files_have_normal_permissions(run_cli, sd_folder, tmp_path):
    code, _, _ = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "2", "--output", tmp_path / "p.png")
    mask = os.umask(0)
    os.umask(mask)
    assert code == 0 and stat.S_IMODE((tmp_path / "p.png").stat().st_mode) == 0o666 & ~mask
