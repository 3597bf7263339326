"""stepdiff generate --fast / --cache: the policies reach the run, compose with the other callbacks, are
written into the image's metadata, and bad settings fail before the model loads (exit 2, one line)."""

import json

import pytest
from PIL import Image

from stepdiff.caching import describe, fast_preset


@pytest.fixture(autouse=True)
def _in_a_fresh_folder(tmp_path, monkeypatch):
    """A run that succeeds by mistake writes its stepdiff-NNNNN.png here, never into the repository."""
    monkeypatch.chdir(tmp_path)


def metadata(path):
    with Image.open(path) as image:
        return image.text["parameters"], json.loads(image.text["stepdiff"])


def test_fast_reaches_the_run_says_what_it_is_and_is_recorded(run_cli, sd_folder, tmp_path):
    target = tmp_path / "fast.png"
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", 6, "--output", target)
    assert code == 0, err
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", 6, "--fast", "--output", target,
                             "--overwrite")
    assert code == 0, err
    preset = describe(fast_preset(6))  # CFG cutoff after step int(0.3 * 6) = 1, DeepCache interval 3 branch 0
    assert f"stepdiff: --fast: {preset}\n" in err
    assert "CFGCutoffCallback(cutoff_step_ratio=0.3, cutoff_step_index=None)" in preset and "DeepCacheCallback(cache_interval=3, cache_branch_id=0" in preset
    parameters, meta = metadata(target)
    record = meta["record"]
    assert record["cached_calls"] > 0 and record["blocks_skipped"] > 0
    assert record["rows_per_step"] == [2, 2, 1, 1, 1, 1]  # guidance off after the cutoff step
    assert meta["cache"] == preset
    assert f"Cache: {json.dumps(preset)}" in parameters


def test_without_a_cache_flag_nothing_is_cached_or_said(run_cli, sd_folder, tmp_path):
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", 3, "--output", tmp_path / "p.png")
    assert code == 0, err
    assert "--fast" not in err and "--cache" not in err
    parameters, meta = metadata(tmp_path / "p.png")
    assert meta["record"]["cached_calls"] == 0 and meta["cache"] is None and "Cache:" not in parameters


def test_cache_composes_with_cutoff_and_stop_at(run_cli, sd_folder, tmp_path):
    target = tmp_path / "c.png"
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", 6, "--cache", " DeepCache:2 ",
                           "--cfg-cutoff", 0.5, "--stop-at", 3, "--output", target)
    assert code == 0, err
    assert "stepdiff: --cache: DeepCacheCallback(cache_interval=2, cache_branch_id=0" in err
    _, meta = metadata(target)
    record = meta["record"]
    assert record["rows_per_step"] == [2, 2, 2, 2]  # the cutoff still guides through step 3; the stop still stops
    assert record["interrupted"] and record["steps_completed"] == 4
    assert record["cached_calls"] == 2  # steps 1 and 3 of 0..3 reuse the deep blocks
    assert meta["cache"].startswith("DeepCacheCallback(cache_interval=2")


def test_fast_gate_counts_the_steps_that_run_in_image_to_image(run_cli, sd_folder, tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "init.png")
    code, _, err = run_cli("generate", "a cat", "--model", sd_folder, "--steps", 10, "--init-image", tmp_path / "init.png",
                           "--strength", 0.5, "--fast", "--output", tmp_path / "i.png")
    assert code == 0, err
    assert "cutoff_step_ratio=0.3" in err  # 30% of the 5 steps that run (int(1.5) = 1), not of 10 (3)
    _, meta = metadata(tmp_path / "i.png")
    assert meta["record"]["rows_per_step"] == [2, 2, 1, 1, 1]


@pytest.mark.parametrize(("args", "words"), [
    (["--fast", "--cache", "deepcache:3"], ["argument --cache: not allowed with argument --fast"]),
    (["--cache", "nope:3"], ["--cache: 'nope:3' is not a policy", "deepcache:INTERVAL[:BRANCH]", "tgate:GATE_STEP"]),
    (["--cache", ""], ["--cache must be deepcache:INTERVAL"]),
    (["--cache", "deepcache:a"], ["--cache: 'deepcache:a'"]),
    (["--cache", "deepcache:3:0:1"], ["--cache: 'deepcache:3:0:1' is not a policy"]),
    (["--cache", "tgate:0"], ["--cache: 'tgate:0'", "gate_step must be an int >= 1"]),
    (["--cache", "fbc:2"], ["--cache: 'fbc:2'", "threshold must be a number in [0, 1]"]),
    (["--cache", "fbc:0.1,deepcache:3"], ["--cache: FirstBlockCacheCallback and DeepCacheCallback both cache", "use one of them"]),
    (["--cache", "tgate:3,tgate:4"], ["--cache: TGateCallback is given twice"]),
])
def test_bad_cache_flags_fail_before_the_model_loads(run_cli, sd_folder, tmp_path, monkeypatch, args, words, loader):
    loader(lambda *a: pytest.fail("the model must not load"))
    code, out, err = run_cli("generate", "a cat", "--model", sd_folder, *args)
    assert code == 2
    for word in words:
        assert word in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert out == "" and not list(tmp_path.glob("stepdiff-*"))


def test_fast_on_a_model_without_a_unet_fails_before_it_loads(run_cli, sd3_folder, monkeypatch, loader):
    loader(lambda *a: pytest.fail("the model must not load"))
    code, _, err = run_cli("generate", "a cat", "--model", sd3_folder, "--fast")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--fast: DeepCacheCallback caches a UNet's blocks" in err and "fbc:THRESHOLD" in err
    code, _, err = run_cli("generate", "a cat", "--model", sd3_folder, "--cache", "deepcache:3")
    assert code == 2 and "--cache: DeepCacheCallback caches a UNet's blocks" in err


def test_help_explains_fast_and_cache(run_cli):
    code, out, _ = run_cli("generate", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "--fast" in text and "the fast preset: classifier-free guidance off after 30% of the steps" in text
    assert "--cache SPEC" in text and "deepcache:INTERVAL[:BRANCH]" in text and "fbc:THRESHOLD" in text
    code, out, _ = run_cli("batch", "--help")
    text = " ".join(out.split())
    assert code == 0 and "--fast" in text and "--cache SPEC" in text and "a row's own fast or cache replaces it" in text
