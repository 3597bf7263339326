"""Issue 16, CLI half: limits, devices, seeds, output formats and names, overwrites, interruptions, prompt warnings."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import stepdiff
from stepdiff.images import claim_free_paths, claim_paths, release_claims
from stepdiff.limits import ModelShape, estimate_memory
from stepdiff.vocabulary import prompt_tokens, unknown_words

SRC = str(Path(stepdiff.__file__).resolve().parents[1])


@pytest.fixture(autouse=True)
def _in_a_fresh_folder(tmp_path, monkeypatch):
    """A run that succeeds by mistake writes its stepdiff-NNNNN.png here, never into the repository."""
    monkeypatch.chdir(tmp_path)


def one_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


# ------------------------------------------------------------------------------------------ devices, seeds


def test_bogus_device(run_cli, sd_folder):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--device", "bogus")
    one_error(code, err, "--device 'bogus' is not a torch device; use cpu, cuda")


def test_device_type_stepdiff_does_not_run_on(run_cli, sd_folder):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--device", "meta")
    one_error(code, err, "--device 'meta': stepdiff runs on cpu, cuda, mps or xpu")


def test_cuda_on_cpu_only_torch(run_cli, sd_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--device", "cuda")
    one_error(code, err, "--device 'cuda': this torch", "cannot use a cuda device here; use --device cpu")


def test_cuda_index_beyond_the_devices(run_cli, sd_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--device", "cuda:3")
    one_error(code, err, "--device 'cuda:3': this machine has 1 cuda device(s)")


@pytest.mark.parametrize("args,message", [
    (["--seed", str(2**64)], f"--seed must be in [0, 2**64-1], got {2**64}"),
    (["--seed", "-1"], "--seed must be in [0, 2**64-1], got -1"),
    (["--seed", str(2**64 - 1), "--num-images", "2"], "runs past the largest seed, 2**64-1"),
])
def test_seed_range(run_cli, sd_folder, args, message):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, *args)
    one_error(code, err, message)


def test_largest_seed_is_accepted(run_cli, sd_folder, tmp_path):
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "1", "--seed", 2**64 - 1,
                             "--output", tmp_path / "s.png")
    assert code == 0, err
    assert json.loads(Image.open(tmp_path / "s.png").text["stepdiff"])["seed"] == 2**64 - 1


# ------------------------------------------------------------------------------------------ limits


def test_num_images_beyond_memory_is_refused_before_loading(run_cli, sd_folder, monkeypatch, loader):
    loader(lambda *a: pytest.fail("the model must not load"))
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--num-images", "100000000")
    one_error(code, err, "--num-images 100000000 need about", "of memory (an estimate); the limit is",
              "raise the limit with --max-memory GIB")


def test_huge_size_is_refused_with_an_estimate(run_cli, sd_folder):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--size", "100000x100000")
    one_error(code, err, "--size 100000x100000 is 3125 times the model's native 32x32 per side; the limit is 8 times",
              "TiB", "pass --force")


def test_shipped_model_4096_with_one_step_is_refused_not_silent(run_cli):
    code, _, err = run_cli("generate", "a red circle on a blue background", "--size", "4096x4096", "--steps", "1")
    one_error(code, err, "--size 4096x4096 is 64 times the model's native 64x64", "GiB", "--force")


def test_force_lifts_the_size_ratio_but_not_the_memory_limit(run_cli, sd_folder):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--size", "512x512", "--force", "--max-memory", "0.01")
    one_error(code, err, "--size 512x512 and --num-images 1 need about", "the limit is 10.2 MiB, --max-memory")
    assert "warning: --size 512x512 is 16 times" not in err  # refused: no warning before the error


def test_max_memory_is_the_named_limit(run_cli, sd_folder):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--max-memory", "0.001")
    one_error(code, err, "the limit is 1.0 MiB, --max-memory")
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--max-memory", "-1")
    one_error(code, err, "--max-memory: must be a number of GiB > 0, got '-1'")


def test_size_far_above_native_warns(run_cli, sd_folder, tmp_path):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "1", "--size", "96x96",
                           "--output", tmp_path / "w.png")
    assert code == 0, err
    assert "warning: --size 96x96 is 3 times the model's native 32x32 per side" in err
    assert "stepdiff: denoising done; decoding 1 image(s) at 96x96" in err  # the slow decode is not silent


def test_memory_estimate_grows_with_pixels_and_images(sd_folder):
    shape = ModelShape.from_folder(sd_folder)
    base = estimate_memory(shape, 64, 64, 1)
    assert estimate_memory(shape, 128, 128, 1) > base and estimate_memory(shape, 64, 64, 8) > base
    assert estimate_memory(shape, 64, 64, 1, "float16") <= base
    assert shape.native_size == 32 and shape.weight_bytes > 0


# ------------------------------------------------------------------------------------------ other flags


@pytest.mark.parametrize("args,message", [
    (["--guidance", "1e30"], "--guidance must be a number in [0, 100], got 1e+30"),
    (["--guidance", "inf"], "--guidance must be a number in [0, 100], got inf"),
    (["--guidance", "-1"], "--guidance must be a number in [0, 100], got -1"),
    (["--karras", "--scheduler", "ddim"], "--karras: scheduler 'ddim' has no Karras sigmas; add --scheduler with one of: lms, euler"),
    (["--karras", "--scheduler", "euler-a"], "--karras: scheduler 'euler-a' has no Karras sigmas"),
    (["--steps", "1001", "--scheduler", "ddim"], "--steps must be in [1, 1000] with scheduler 'ddim' (the model was trained with 1000 steps), got 1001"),
    (["--steps", "10001"], "--steps must be in [1, 10000], got 10001"),
    (["--cfg-cutoff-step", "-1"], "--cfg-cutoff-step must be >= 0, got -1"),
    (["--stop-at", "-2"], "--stop-at must be >= 0, got -2"),
    (["--patience", "0"], "--patience must be >= 1, got 0"),
    (["--preview-every", "0"], "--preview-every must be >= 1, got 0"),
    (["--negative", "\udcff"], "--negative is not valid UTF-8 text"),
])
def test_more_bad_generate_flags(run_cli, sd_folder, args, message):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, *args)
    one_error(code, err, message)


def test_karras_with_the_models_own_scheduler(run_cli):
    # the shipped model's own scheduler is DDIM, which has no Karras sigmas
    code, _, err = run_cli("generate", "a red circle", "--karras")
    one_error(code, err, "--karras: scheduler 'DDIMScheduler' has no Karras sigmas")


def test_sampler_name_says_karras_only_when_used(run_cli, sd_folder, tmp_path):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "2", "--scheduler", "euler",
                           "--output", tmp_path / "e.png")
    assert code == 0, err
    image = Image.open(tmp_path / "e.png")
    assert "Sampler: Euler," in image.text["parameters"] and json.loads(image.text["stepdiff"])["karras"] is False


@pytest.mark.parametrize("args,message", [
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--seeds-per-combo", "0"], "--seeds-per-combo must be in [1, 10000], got 0"),
    (["--guidance", "7", "1e30"], "--guidance must be a number in [0, 100], got 1e+30"),
    (["--batch", "100000000"], "--batch 100000000 images need about"),
])
def test_eval_shapes_bad_flags(run_cli, sd_folder, args, message):
    code, _, err = run_cli("eval-shapes", "--model", sd_folder, *args)
    one_error(code, err, message)


def test_eval_shapes_json_is_not_overwritten(run_cli, sd_folder, tmp_path):
    target = tmp_path / "r.json"
    target.write_text("keep")
    code, _, err = run_cli("eval-shapes", "--model", sd_folder, "--json", target)
    one_error(code, err, f"--json '{target}' already exists; pass --overwrite")
    assert target.read_text() == "keep"


@pytest.mark.parametrize("count", ["0", "3", "-5", "100000000"])
def test_fit_preview_count(run_cli, sd_folder, count):
    code, _, err = run_cli("fit-preview", sd_folder, "--count", count)
    one_error(code, err, f"--count must be in [4, 16384] (3/4 fit the table, 1/4 check it), got {count}")


def test_fit_preview_images_folder(run_cli, sd_folder, tmp_path):
    code, _, err = run_cli("fit-preview", sd_folder, "--images", tmp_path / "missing")
    one_error(code, err, "--images", "is not a folder of images")
    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    code, _, err = run_cli("fit-preview", sd_folder, "--images", tmp_path)
    one_error(code, err, "--images", "holds 1 .png/.jpg/.webp images; at least 4 are needed")


# ------------------------------------------------------------------------------------------ output files


@pytest.mark.parametrize("name,fmt", [("x.jpg", "JPEG"), ("x.JPEG", "JPEG"), ("x.webp", "WEBP"), ("x.png", "PNG")])
def test_output_format_follows_the_extension(run_cli, sd_folder, tmp_path, name, fmt):
    target = tmp_path / name
    code, out, err = run_cli("generate", "a cat 猫", "--model", sd_folder, "--steps", "1", "--seed", "5", "--output", target)
    assert code == 0, err
    image = Image.open(target)
    assert image.format == fmt
    if fmt == "PNG":
        params, record = image.text["parameters"], json.loads(image.text["stepdiff"])
    else:  # EXIF UserComment (as the web UIs write it) and ImageDescription
        exif = image.getexif()
        comment = exif.get_ifd(0x8769)[0x9286]
        assert comment.startswith(b"UNICODE\0")
        params, record = comment[8:].decode("utf-16-be"), json.loads(exif[0x010E])
    assert params.startswith("a cat 猫\nSteps: 1, Sampler: Euler,") and "Seed: 5" in params
    assert record["prompt"] == "a cat 猫" and record["seed"] == 5


@pytest.mark.parametrize("words,lost", [(6500, "the stepdiff record"), (9000, "any metadata")])
def test_jpeg_metadata_too_long_for_exif_is_dropped_with_a_warning(run_cli, sd_folder, tmp_path, words, lost):
    prompt = "cat " * words  # 52 KB (72 KB) of UTF-16 in UserComment, plus the JSON record
    code, _, err = run_cli("generate", prompt, "--model", sd_folder, "--steps", "1", "--output", tmp_path / "l.jpg")
    assert code == 0, err
    assert err.count("metadata is too long") == 1
    assert f"warning: the metadata is too long for JPEG's 64 KiB EXIF; {tmp_path / 'l.jpg'} is written without {lost}" in err
    exif = Image.open(tmp_path / "l.jpg").getexif()
    assert 0x010E not in exif
    assert (0x9286 in exif.get_ifd(0x8769)) == (lost == "the stepdiff record")


@pytest.mark.parametrize("name", ["x.gif", "x.tiff", "x", "x.png.bak"])
def test_unknown_output_extension_is_refused(run_cli, sd_folder, tmp_path, name):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--output", tmp_path / name)
    one_error(code, err, "--output must end in .png, .jpg, .jpeg, .webp")


def test_several_images_keep_the_extension(run_cli, sd_folder, tmp_path):
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "1", "--num-images", "2",
                             "--output", tmp_path / "a.webp")
    assert code == 0, err
    assert [Path(p).name for p in out.split()] == ["a-1.webp", "a-2.webp"]
    assert all(Image.open(p).format == "WEBP" for p in out.split())


def test_existing_output_is_refused_unless_overwrite(run_cli, sd_folder, tmp_path, monkeypatch, loader):
    loader(lambda *a: pytest.fail("the model must not load"))
    target = tmp_path / "x.png"
    target.write_bytes(b"precious")
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--output", target)
    one_error(code, err, f"--output '{target}' already exists; pass --overwrite to replace it")
    assert target.read_bytes() == b"precious"
    (tmp_path / "y-2.png").write_bytes(b"precious")
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--output", tmp_path / "y.png", "--num-images", "3")
    one_error(code, err, "y-2.png' already exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png", "y-2.png"]  # nothing reserved is left


def test_overwrite_replaces(run_cli, sd_folder, tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "1", "--output", target, "--overwrite")
    assert code == 0, err
    assert Image.open(target).format == "PNG"


def test_claims_are_atomic_across_threads(tmp_path):
    barrier = threading.Barrier(8)
    results = []

    def worker():
        barrier.wait()
        results.append(claim_free_paths(tmp_path, "stepdiff", 5))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = [p.name for paths in results for p in paths]
    assert len(names) == 40 and len(set(names)) == 40
    assert sorted(names) == [f"stepdiff-{n:05d}.png" for n in range(1, 41)]


def test_claims_are_atomic_across_processes(tmp_path):
    go = tmp_path / "go"
    code = (
        "import sys, time, pathlib\n"
        f"sys.path.insert(0, {SRC!r})\n"
        "from stepdiff.images import claim_free_paths\n"
        f"go = pathlib.Path({str(go)!r})\n"
        "while not go.exists(): time.sleep(0.001)\n"
        f"print(' '.join(p.name for p in claim_free_paths(pathlib.Path({str(tmp_path)!r}), 'stepdiff', 30)))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(outs[0]) == len(outs[1]) == 30 and not set(outs[0]) & set(outs[1])


def test_two_cli_processes_at_once_in_one_folder_get_different_names(sd_folder, tmp_path):
    # The names used to be chosen at the start and written at the end, so two runs both took stepdiff-00001.png.
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "stepdiff.cli", "generate", "a cat", "--model", str(sd_folder),
                               "--steps", "1", "--seed", str(seed)], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for seed in (1, 2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert sorted(Path(out.strip()).name for out, _ in results) == ["stepdiff-00001.png", "stepdiff-00002.png"]
    seeds = {json.loads(Image.open(tmp_path / n).text["stepdiff"])["seed"] for n in ("stepdiff-00001.png", "stepdiff-00002.png")}
    assert seeds == {1, 2}  # both images kept


def test_claim_paths_refuses_and_release_removes_only_placeholders(tmp_path):
    (tmp_path / "b.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="b.png' already exists; pass --overwrite"):
        claim_paths([tmp_path / "a.png", tmp_path / "b.png"])
    assert not (tmp_path / "a.png").exists()
    claimed = claim_paths([tmp_path / "c.png"])
    release_claims([*claimed, tmp_path / "b.png"])
    assert not (tmp_path / "c.png").exists() and (tmp_path / "b.png").read_bytes() == b"x"


def test_a_concurrent_runs_placeholder_is_skipped(run_cli, sd_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stepdiff-00001.png").touch()  # another run has reserved this name and is still generating
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "1")
    assert code == 0, err
    assert Path(out.strip()).name == "stepdiff-00002.png"
    assert (tmp_path / "stepdiff-00001.png").stat().st_size == 0


def test_failed_run_leaves_no_placeholder(run_cli, sd_folder, tmp_path, monkeypatch, loader):
    monkeypatch.chdir(tmp_path)

    def broken(*a):
        raise ValueError("broken model")

    loader(broken)
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--num-images", "3")
    one_error(code, err, "broken model")
    assert list(tmp_path.iterdir()) == []


def test_a_run_whose_numbers_blow_up_is_one_line_exit_1_and_leaves_nothing(run_cli, sd_folder, tmp_path, monkeypatch):
    from stepdiff.callbacks import NaNGuard
    from stepdiff.preview import PreviewCallback

    def nan_at_step_2(self, pipeline, i, t, kw):
        if i == 2:
            NaNGuard()(pipeline, i, t, {"latents": kw[self.source] * float("nan")})

    monkeypatch.setattr(PreviewCallback, "__call__", nan_at_step_2)
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "4", "--preview-dir", "p")
    assert code == 1 and out == ""
    assert err.strip().splitlines()[-1].startswith("stepdiff: error: latents became NaN or inf at step 2")
    assert "Traceback" not in err and "FloatingPointError" not in err
    assert list(tmp_path.iterdir()) == []  # no reserved name, no preview folder


def test_tiny_model_refuses_a_non_empty_folder(run_cli, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli("tiny-model", out)
    one_error(code, err, f"tiny-model OUT '{out}' is a folder that is not empty; pass --overwrite")
    assert (out / "notes.txt").read_text() == "mine"
    code, _, err = run_cli("tiny-model", out, "--overwrite")
    assert code == 0, err
    assert (out / "model_index.json").is_file() and not (out / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary or old folder left
    (tmp_path / "f").write_text("a file")
    code, _, err = run_cli("tiny-model", tmp_path / "f")
    one_error(code, err, "is a file, not a folder")


def test_tiny_model_into_an_empty_folder(run_cli, tmp_path):
    (tmp_path / "e").mkdir()
    code, _, err = run_cli("tiny-model", tmp_path / "e")
    assert code == 0 and (tmp_path / "e" / "model_index.json").is_file()


@pytest.mark.parametrize("flag,name,message", [
    ("--animation", "a.gif", "--animation '{}' already exists; pass --overwrite"),
    ("--contact-sheet", "s.png", "--contact-sheet '{}' already exists; pass --overwrite"),
])
def test_existing_preview_files_are_refused(run_cli, sd_folder, tmp_path, flag, name, message):
    (tmp_path / name).write_bytes(b"old")
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, flag, tmp_path / name)
    one_error(code, err, message.format(tmp_path / name))


def test_preview_dir_with_frames_is_refused(run_cli, sd_folder, tmp_path):
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "0.png").write_bytes(b"old")
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--preview-dir", tmp_path / "steps")
    one_error(code, err, "--preview-dir", "already holds 1 preview frame(s) (0.png, ...); choose another folder or pass --overwrite")


def test_output_and_contact_sheet_must_differ(run_cli, sd_folder, tmp_path):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--output", tmp_path / "a.png",
                           "--contact-sheet", tmp_path / "a.png")
    one_error(code, err, "--contact-sheet", "is also the --output file")


def test_jpg_contact_sheet_is_a_jpeg(run_cli, sd_folder, tmp_path):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "2", "--output", tmp_path / "a.png",
                           "--contact-sheet", tmp_path / "s.jpg")
    assert code == 0, err
    assert Image.open(tmp_path / "s.jpg").format == "JPEG"


# ------------------------------------------------------------------------------------------ interruptions


def _signal_at_step(monkeypatch, step, *signals):
    from stepdiff.preview import PreviewCallback

    original = PreviewCallback.__call__

    def call(self, pipeline, i, t, kw):
        result = original(self, pipeline, i, t, kw)
        if i == step:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return result

    monkeypatch.setattr(PreviewCallback, "__call__", call)


def test_second_ctrl_c_removes_the_frames_and_says_so(run_cli, sd_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _signal_at_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "8", "--preview-dir", "steps",
                             "--animation", "a.gif")
    assert code == 130 and out == ""
    assert err.strip().splitlines()[-1] == "stepdiff: aborted; nothing written (removed the 3 preview frames it wrote in 'steps')"
    assert list(tmp_path.iterdir()) == []  # no frames, no folder it made, no reserved image name, no animation


def test_first_ctrl_c_keeps_the_image(run_cli, sd_folder, tmp_path, monkeypatch):
    _signal_at_step(monkeypatch, 1, signal.SIGINT)
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "8", "--preview-dir", tmp_path / "p",
                             "--output", tmp_path / "i.png")
    assert code == 0, err
    assert "stopping after this step" in err and (tmp_path / "i.png").is_file()
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["0.png", "1.png"]


def test_sigterm_in_process(run_cli, sd_folder, tmp_path, monkeypatch):
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "notes.txt").write_text("mine")
    _signal_at_step(monkeypatch, 0, signal.SIGTERM)
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "8", "--preview-dir", tmp_path / "steps",
                             "--output", tmp_path / "i.png")
    assert code == 143  # above the message: the progress bar
    assert err.strip().splitlines()[-1] == (
        f"stepdiff: terminated; nothing written (removed the 1 preview frame it wrote in '{tmp_path / 'steps'}')")
    assert [p.name for p in (tmp_path / "steps").iterdir()] == ["notes.txt"] and not (tmp_path / "i.png").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_sigterm_to_a_real_process(sd_folder, tmp_path):
    frames = tmp_path / "steps"
    env = {**os.environ, "PYTHONPATH": SRC, "STEPDIFF_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepdiff.cli", "generate", "a cat", "--model", str(sd_folder), "--steps", "1000",
         "--preview-dir", str(frames), "--output", str(tmp_path / "i.png")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        while not (frames.is_dir() and len(list(frames.glob("*.png"))) >= 2):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stepdiff: terminated; nothing written (removed the ") and "Traceback" not in err
    assert f"preview frames it wrote in '{frames}')" in last
    assert out == "" and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ prompt warnings


def test_unknown_words_include_emoji_and_cjk(sd_pipe):
    unknown, _ = unknown_words(sd_pipe.tokenizer, "a cat 🐱 猫, on a mat!")
    assert "🐱" in unknown and "猫" in unknown and "," not in unknown and "!" not in unknown
    unknown, known = unknown_words(sd_pipe.tokenizer, "猫 🐱 red", vocabulary=["red", "circle"])
    assert unknown == ["猫", "🐱"] and known == ["circle", "red"]


def test_cli_warns_about_emoji_and_cjk(run_cli, tmp_path):
    code, _, err = run_cli("generate", "a red circle 🐱 on a blue background 猫", "--steps", "1", "--output", tmp_path / "c.png")
    assert code == 0, err
    assert "warning: the model does not know 🐱, 猫 and ignores them; it knows:" in err


def test_long_prompt_warns_that_it_is_cut(run_cli, sd_folder, sd_pipe, tmp_path):
    prompt = "a cat " * 2000
    tokens, limit = prompt_tokens(sd_pipe.tokenizer, prompt)
    assert tokens == 4002 and limit == 77
    code, _, err = run_cli("generate", prompt, "--model", sd_folder, "--steps", "1", "--negative", "dog " * 100,
                           "--output", tmp_path / "p.png")
    assert code == 0, err
    assert "warning: the prompt is 4002 tokens but the text encoder reads only the first 77" in err
    assert "warning: --negative is 102 tokens" in err
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", "1", "--output", tmp_path / "q.png")
    assert "tokens" not in err


# ------------------------------------------------------------------------------------------ docs


def test_docs_guidance_interval_example_counts_right(sd_pipe):
    import re

    from stepdiff.callbacks import GuidanceIntervalCallback

    readme = (Path(__file__).resolve().parents[1] / "docs" / "callbacks.md").read_text()
    expr, claimed = re.search(r"rows_per_step +# (\[1\]\*5 \+ \[2\]\*15 \+ \[1\]\*5): (\d+) model rows", readme).groups()
    out = sd_pipe("a cat", guidance_scale=7.0, num_inference_steps=25, output_type="latent",
                  callback_on_step_end=GuidanceIntervalCallback(start_ratio=0.2, end_ratio=0.8))
    assert out.record.rows_per_step == [1] * 5 + [2] * 15 + [1] * 5
    assert sum(out.record.rows_per_step) == int(claimed) == 40 and expr == "[1]*5 + [2]*15 + [1]*5"
