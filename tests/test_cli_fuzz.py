"""CLI fuzz suite (issue 16): every subcommand's flags with wrong types, out-of-range, huge, empty and unicode
values, and paths that are missing, files, folders, read-only or already there.

The rule for every case: exit 0, or exit 2 with exactly one line on stderr that names the flag; never a
traceback. ``stepdiff.cli.main`` runs in-process. The table runs the real thing (generation at --steps 1
on a tiny model); the hypothesis part throws arbitrary values at each flag and stops a run that passes
every check where the model would load, then checks that the run left no file behind.
"""

import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stepdiff.cli import main

OK = "exit 0"


def g(*args):
    return ["generate", "a cat", "--model", "{model}", *args]


def e(*args):
    return ["eval-shapes", "--model", "{model}", *args]


# (argv, expected): OK, or the flag the one-line error must name. "{...}" are paths set up per case.
CASES = [
    # generate: --steps
    (g("--steps", "1"), OK),
    (g("--steps", "0"), "--steps"),
    (g("--steps", "-1"), "--steps"),
    (g("--steps", "abc"), "--steps"),
    (g("--steps", "1.5"), "--steps"),
    (g("--steps", ""), "--steps"),
    (g("--steps", "9" * 30), "--steps"),
    (g("--steps", "1001", "--scheduler", "ddpm"), "--steps"),
    (g("--steps"), "--steps"),
    # --guidance
    (g("--guidance", "abc"), "--guidance"),
    (g("--guidance", "nan"), "--guidance"),
    (g("--guidance", "inf"), "--guidance"),
    (g("--guidance", "-0.5"), "--guidance"),
    (g("--guidance", "1e30"), "--guidance"),
    (g("--guidance", "100.5"), "--guidance"),
    (g("--guidance", "0", "--steps", "1"), OK),
    (g("--guidance", "100", "--steps", "1"), OK),
    # --seed
    (g("--seed", "-1"), "--seed"),
    (g("--seed", str(2**64)), "--seed"),
    (g("--seed", str(10**40)), "--seed"),
    (g("--seed", "1e3"), "--seed"),
    (g("--seed", str(2**64 - 1), "--steps", "1"), OK),
    (g("--seed", str(2**64 - 1), "--num-images", "2"), "--seed"),
    # --size
    (g("--size", "0x0"), "--size"),
    (g("--size", "8x"), "--size"),
    (g("--size", "x"), "--size"),
    (g("--size", "64"), "--size"),
    (g("--size", "64x64x64"), "--size"),
    (g("--size", "-8x8"), "--size"),
    (g("--size", "30x32"), "--size"),
    (g("--size", "100000x100000"), "--size"),
    (g("--size", "512x512"), "--size"),  # 16 times the native 32x32: refused without --force
    (g("--size", "６４x６４", "--steps", "1"), OK),  # full-width digits are digits
    (g("--size", "40x24", "--steps", "1"), OK),
    # --num-images
    (g("--num-images", "0"), "--num-images"),
    (g("--num-images", "-3"), "--num-images"),
    (g("--num-images", "100000000"), "--num-images"),
    (g("--num-images", "two"), "--num-images"),
    (g("--num-images", "2", "--steps", "1"), OK),
    # --device, --dtype, --max-memory
    (g("--device", "bogus"), "--device"),
    (g("--device", ""), "--device"),
    (g("--device", "meta"), "--device"),
    (g("--device", "cpu:0", "--steps", "1"), OK),
    (g("--device", "cuda:99"), "--device"),
    (g("--dtype", "float64"), "--dtype"),
    (g("--dtype", "bfloat16", "--steps", "1"), OK),
    (g("--max-memory", "0"), "--max-memory"),
    (g("--max-memory", "abc"), "--max-memory"),
    (g("--max-memory", "inf"), "--max-memory"),
    (g("--max-memory", "0.001"), "--max-memory"),
    # --scheduler, --karras
    (g("--scheduler", "nope"), "--scheduler"),
    (g("--scheduler", ""), "--scheduler"),
    (g("--scheduler", "ddim", "--karras"), "--karras"),
    (g("--scheduler", "euler", "--karras", "--steps", "2"), OK),
    (g("--scheduler", "UniPCMultistepScheduler", "--steps", "2"), OK),
    # --model
    (g("--model", "{missing}"), "--model"),
    (g("--model", "{file}"), "--model"),
    (g("--model", "{dir}"), "--model"),
    (g("--model", "{broken_model}"), "--model"),
    # --output
    (g("--output", "{missing}/x.png"), "--output"),
    (g("--output", "{dir}"), "--output"),
    (g("--output", "{file}/x.png"), "--output"),
    (g("--output", "{readonly}/x.png"), "--output"),
    (g("--output", "{png}"), "--output"),
    (g("--output", "{png}", "--overwrite", "--steps", "1"), OK),
    (g("--output", "x.bmp"), "--output"),
    (g("--output", "x"), "--output"),
    (g("--output", ""), "--output"),
    (g("--output", "画像.webp", "--steps", "1"), OK),
    (g("--output", "with space.jpg", "--steps", "1"), OK),
    # guidance cutoff and stopping
    (g("--cfg-cutoff", "2"), "--cfg-cutoff"),
    (g("--cfg-cutoff", "-0.1"), "--cfg-cutoff"),
    (g("--cfg-cutoff", "half"), "--cfg-cutoff"),
    (g("--cfg-cutoff", "0.5", "--cfg-cutoff-step", "2"), "--cfg-cutoff"),
    (g("--cfg-cutoff-step", "-1"), "--cfg-cutoff-step"),
    (g("--cfg-cutoff-step", "99", "--steps", "2"), OK),
    (g("--stop-at", "-1"), "--stop-at"),
    (g("--stop-at", "0", "--steps", "3"), OK),
    (g("--stop-on-convergence", "0"), "--stop-on-convergence"),
    (g("--stop-on-convergence", "nan"), "--stop-on-convergence"),
    (g("--stop-on-convergence", "inf"), "--stop-on-convergence"),
    (g("--patience", "0"), "--patience"),
    (g("--patience", "x"), "--patience"),
    # previews
    (g("--preview-every", "0"), "--preview-every"),
    (g("--preview-dir", "{file}"), "--preview-dir"),
    (g("--preview-dir", "{missing}/a/b"), "--preview-dir"),
    (g("--preview-dir", "{readonly}"), "--preview-dir"),
    (g("--preview-dir", "{frames}"), "--preview-dir"),
    (g("--preview-dir", "{frames}", "--overwrite", "--steps", "1"), OK),
    (g("--preview-dir", "new", "--steps", "2", "--animation", "a.gif", "--contact-sheet", "s.jpg"), OK),
    (g("--preview-source", "noise"), "--preview-source"),
    (g("--preview-method", "fancy"), "--preview-method"),
    (g("--animation", "a.png"), "--animation"),
    (g("--animation", "{dir}"), "--animation"),
    (g("--animation", "{gif}"), "--animation"),
    (g("--contact-sheet", "s.bmp"), "--contact-sheet"),
    (g("--contact-sheet", "{missing}/s.png"), "--contact-sheet"),
    # prompts
    (g("--negative", "", "--steps", "1"), OK),
    (g("--negative", "🐱", "--steps", "1"), OK),
    (["generate", "", "--model", "{model}", "--steps", "1"], OK),
    (["generate", "🐱🐶 猫", "--model", "{model}", "--steps", "1"], OK),
    (["generate", "a cat " * 3000, "--model", "{model}", "--steps", "1"], OK),
    (["generate", "\udcff", "--model", "{model}"], "PROMPT"),
    (g("--negative", "\udcff"), "--negative"),
    (["generate"], "prompt"),
    (g("--bogus-flag"), "--bogus-flag"),
    # eval-shapes
    (e("--batch", "0"), "--batch"),
    (e("--batch", "-1"), "--batch"),
    (e("--batch", "100000000"), "--batch"),
    (e("--seeds-per-combo", "0"), "--seeds-per-combo"),
    (e("--seeds-per-combo", str(10**9)), "--seeds-per-combo"),
    (e("--guidance"), "--guidance"),
    (e("--guidance", "nan"), "--guidance"),
    (e("--guidance", "7", "1e30"), "--guidance"),
    (e("--cfg-cutoff", "7"), "--cfg-cutoff"),
    (e("--json", "{dir}"), "--json"),
    (e("--json", "{missing}/r.json"), "--json"),
    (e("--json", "{file}"), "--json"),
    (e("--steps", "0"), "--steps"),
    (e("--device", "bogus"), "--device"),
    (e("--steps", "1", "--seeds-per-combo", "1", "--guidance", "1", "--cfg-cutoff", "--json", "r.json"), OK),
    # fit-preview
    (["fit-preview", "{fit_model}", "--count", "0"], "--count"),
    (["fit-preview", "{fit_model}", "--count", "-1"], "--count"),
    (["fit-preview", "{fit_model}", "--count", "x"], "--count"),
    (["fit-preview", "{fit_model}", "--count", str(10**12)], "--count"),
    (["fit-preview", "{fit_model}", "--images", "{missing}"], "--images"),
    (["fit-preview", "{fit_model}", "--images", "{file}"], "--images"),
    (["fit-preview", "{fit_model}", "--images", "{dir}"], "--images"),
    (["fit-preview", "{fit_model}", "--images", "{bad_images}"], "--images"),
    (["fit-preview", "{missing}"], "fit-preview MODEL"),
    (["fit-preview", "{file}"], "fit-preview MODEL"),
    (["fit-preview", "{readonly_model}"], "fit-preview MODEL"),
    (["fit-preview", "{fit_model}", "--count", "4"], OK),
    (["fit-preview"], "model"),
    # tiny-model
    (["tiny-model", "{nonempty}"], "tiny-model OUT"),
    (["tiny-model", "{file}"], "tiny-model OUT"),
    (["tiny-model", "{missing}/a/b"], "tiny-model OUT"),
    (["tiny-model", "{readonly}/m"], "tiny-model OUT"),
    (["tiny-model", "fresh", "--family", "sd3"], "--family"),
    (["tiny-model", "fresh"], OK),
    (["tiny-model"], "out"),
    # the program itself
    ([], "command"),
    (["bogus"], "command"),
    (["--version"], OK),
    (["generate", "--help"], OK),
]


@pytest.fixture(scope="module")
def fit_model(tmp_path_factory, sd_folder):
    return shutil.copytree(sd_folder, tmp_path_factory.mktemp("fit") / "model")


@pytest.fixture
def paths(tmp_path, sd_folder, fit_model, monkeypatch):
    """Every kind of path a case can name, in a fresh folder that is also the current folder."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    p = {"model": sd_folder, "fit_model": fit_model, "missing": tmp_path / "missing", "file": tmp_path / "file.txt",
         "dir": tmp_path / "empty", "readonly": tmp_path / "readonly", "png": tmp_path / "old.png",
         "gif": tmp_path / "old.gif", "frames": tmp_path / "frames", "nonempty": tmp_path / "nonempty",
         "broken_model": tmp_path / "broken", "bad_images": tmp_path / "bad_images", "readonly_model": sd_folder}
    p["file"].write_text("a file")
    for name in ("dir", "readonly", "frames", "nonempty", "broken_model", "bad_images"):
        p[name].mkdir()
    Image.new("RGB", (8, 8)).save(p["png"])
    Image.new("RGB", (8, 8)).save(p["gif"])
    Image.new("RGB", (8, 8)).save(p["frames"] / "0.png")
    (p["nonempty"] / "notes.txt").write_text("mine")
    (p["broken_model"] / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for i in range(4):
        (p["bad_images"] / f"{i}.png").write_bytes(b"not an image")
    # Tests may run as root, for whom permission bits never bind: answer os.access as for a normal user.
    real_access = os.access
    readonly = {str(p["readonly"]), str(sd_folder)}
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path) in readonly and mode == os.W_OK
                        else real_access(path, mode, **kw))
    return p


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # main returns codes; it must not exit
        pytest.fail(f"main raised SystemExit({exc.code})")
    out, err = capsys.readouterr()
    return code, out, err


def check_rule(code, err, flag=None):
    assert "Traceback" not in err, err
    if code == 0:
        return
    assert code == 2, f"exit {code}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    if flag is not None:
        assert flag in lines[0], f"{flag} not named in: {lines[0]}"


@pytest.mark.parametrize("argv,expected", CASES, ids=[f"{i}:{' '.join(a)[:60]}" for i, (a, _) in enumerate(CASES)])
def test_cli_case(argv, expected, paths, capsys):
    argv = [a.format(**paths) if "{" in a else a for a in argv]
    code, out, err = run(argv, capsys)
    check_rule(code, err, None if expected == OK else expected)
    assert (code == 0) == (expected == OK), f"exit {code}: {err}"


def test_table_size():
    assert len(CASES) >= 100
    assert {argv[0] for argv, _ in CASES if argv and not argv[0].startswith("-")} >= {
        "generate", "eval-shapes", "fit-preview", "tiny-model"}


# ------------------------------------------------------------------------------------------ hypothesis

class _Loads(BaseException):
    """Raised where the model would load: the run passed every check."""


# Real argv strings never hold NUL, so values are drawn without it.
_TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=24)
VALUES = st.one_of(
    _TEXT,
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "0", "-1", "1", "nan", "-inf", "1e309", "8x8", "0x0", "64x64", "x", "🐱", "猫.png", "a/b/c.png",
                     "/", ".", "..", "out.jpg", "out.webp", "frames", "anim.gif", "cuda", "cpu", "euler", "ddim"]),
)
GENERATE_FLAGS = ["--steps", "--guidance", "--seed", "--size", "--num-images", "--device", "--dtype", "--scheduler",
                  "--output", "--cfg-cutoff", "--cfg-cutoff-step", "--stop-at", "--stop-on-convergence", "--patience",
                  "--preview-dir", "--preview-every", "--preview-source", "--preview-method", "--animation",
                  "--contact-sheet", "--max-memory", "--negative", "--model"]


@pytest.mark.parametrize("flag", GENERATE_FLAGS)
def test_generate_flag_fuzz(flag, sd_folder, tmp_path, monkeypatch, capsys, loader):
    def loads(*a, **k):
        raise _Loads

    loader(loads)
    monkeypatch.chdir(tmp_path)

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(value=VALUES, karras=st.booleans())
    def case(value, karras):
        argv = ["generate", "a cat", "--model", str(sd_folder), flag, value, *(["--karras"] if karras else [])]
        try:
            code, _, err = run(argv, capsys)
        except _Loads:
            capsys.readouterr()
        else:
            check_rule(code, err, None if code == 0 else (flag if not karras or "--karras" not in err else "--karras"))
        assert list(tmp_path.iterdir()) == [], "a run that stopped left files behind"

    case()


@pytest.mark.parametrize("flag", ["--batch", "--seeds-per-combo", "--guidance", "--cfg-cutoff", "--json", "--steps"])
def test_eval_shapes_flag_fuzz(flag, sd_folder, tmp_path, monkeypatch, capsys, loader):
    def loads(*a, **k):
        raise _Loads

    loader(loads)
    monkeypatch.chdir(tmp_path)

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(value=VALUES)
    def case(value):
        try:
            code, _, err = run(["eval-shapes", "--model", str(sd_folder), flag, value], capsys)
        except _Loads:
            capsys.readouterr()
        else:
            check_rule(code, err, flag if code else None)

    case()


BATCH_FLAGS = ["INPUT", "--out", "--format", "--steps", "--guidance", "--seed", "--size", "--scheduler", "--device",
               "--dtype", "--max-memory", "--negative", "--cfg-cutoff", "--cfg-cutoff-step", "--guidance-interval",
               "--batch-size", "--threads", "--workers", "--gpus-per-worker", "--model"]


@pytest.mark.parametrize("flag", BATCH_FLAGS)
def test_batch_flag_fuzz(flag, sd_folder, tmp_path, monkeypatch, capsys, loader):
    """``stepdiff batch`` with arbitrary values: a one-line error naming the flag, or a run that reaches the
    model load (stopped there), never a traceback."""
    def loads(*a, **k):
        raise _Loads

    loader(loads)
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(value=VALUES)
    def case(value):
        given_input = value if flag == "INPUT" else str(prompts)
        argv = ["batch", given_input, "--out", "out", "--model", str(sd_folder),
                *([] if flag == "INPUT" else [flag, value])]
        try:
            code, _, err = run(argv, capsys)
        except _Loads:
            capsys.readouterr()
        else:
            check_rule(code, err, None if code == 0 else ("INPUT" if flag == "INPUT" else flag))

    case()
