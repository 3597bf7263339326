"""Previews that look like the picture by default: method="auto" is the model's tiny decoder when it ships one, on
the steps that PreviewBudget chooses from the run's own measured step and frame times (at most 3% of the run), and
the linear table otherwise. The rule is tested with injected timings, never with wall-clock asserts."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import stepdiff
from stepdiff.preview import PREVIEW_DECODER_DIR, PREVIEW_SHARE, PreviewBudget, PreviewCallback, steady_cadence

from .conftest import gen


def simulate(step_seconds, frame_seconds, warmup=0.0, share=PREVIEW_SHARE):
    """A run as PreviewCallback drives the budget: each step's time, then (when it wants one) a frame's cost;
    ``warmup`` is spent before the first frame (a cold decoder's first call)."""
    budget = PreviewBudget(share)
    total = len(step_seconds)
    for i, s in enumerate(step_seconds):
        budget.step_done(s)
        if budget.wants(i, total):
            if warmup and not budget.frame_seconds:
                budget.spend(warmup)
            budget.frame_done(frame_seconds(i) if callable(frame_seconds) else frame_seconds)
    return budget


def test_steady_run_gets_a_frame_every_second_step():
    # shapes-v2 on the 2-core CPU: 28 ms steps, 1.5 ms frames. Every step would be 5.1%; every 2nd is 2.6%.
    budget = simulate([0.028] * 25, 0.0015)
    assert budget.frame_steps == list(range(0, 25, 2)) and budget.cadence == 2
    assert budget.measured_share <= PREVIEW_SHARE
    assert budget.measured_share == pytest.approx(13 * 0.0015 / (25 * 0.028 + 13 * 0.0015))


@pytest.mark.parametrize("name,steps,frames,warmup", [
    ("constant", [0.028] * 25, 0.0015, 0.0),
    ("slow first step (prompt encoding, setup)", [0.5] + [0.028] * 24, 0.0015, 0.0),
    ("cold decoder: a 10 ms warm-up", [0.028] * 25, 0.0015, 0.010),
    ("steps get 4x faster half way", [0.028] * 12 + [0.007] * 38, 0.0015, 0.0),
    ("frames get 2.7x dearer", [0.028] * 50, lambda i: 0.0015 if i < 20 else 0.004, 0.0),
    ("SD 1.5-size UNet and TAESD on a CPU", [12.0] * 30, 1.0, 0.0),
    ("a long run", [0.028] * 1000, 0.0015, 0.0),
    ("frames cost nothing", [0.028] * 25, 0.0, 0.0),
])
def test_rule_keeps_the_share_within_three_percent(name, steps, frames, warmup):
    budget = simulate(steps, frames, warmup)
    total = len(steps)
    assert budget.frame_steps[0] == 0 and budget.frame_steps[-1] == total - 1  # the first and the final preview
    assert budget.measured_share <= PREVIEW_SHARE, name
    assert budget.frame_steps == sorted(set(budget.frame_steps))


def test_cadence_follows_the_run_and_does_not_burst_at_the_end():
    # A long steady run: the cadence is the steady one, d / (k s + d) <= 3%  ->  k = ceil(1.5 * 0.97 / (0.03 * 28)) = 2,
    # also in the last steps (time left over early is not spent in a burst of frames at the end).
    budget = simulate([0.028] * 1000, 0.0015)
    gaps = np.diff(budget.frame_steps[:-1])
    assert set(gaps.tolist()) == {2} and budget.steady_cadence() == 2 == steady_cadence(0.0015, 0.028)
    assert steady_cadence(1.0, 12.0) == 3 and steady_cadence(0.0, 0.028) == 1  # 1 * 0.97 / (0.03 * 12) = 2.7
    # Steps four times faster from step 12 on: frames now cost four times as much of a step, so they spread out.
    faster = simulate([0.028] * 12 + [0.007] * 38, 0.0015)
    early = [s for s in faster.frame_steps if s < 12]
    late = [s for s in faster.frame_steps[:-1] if s > 16]
    assert np.diff(early).max() == 2 and np.diff(late).min() >= 7
    # Frames that cost next to nothing: every step.
    assert simulate([0.028] * 25, 0.0001).frame_steps == list(range(25))


def test_too_dear_for_the_budget_gets_the_first_and_last_frame_only():
    budget = simulate([0.028] * 25, 0.05)  # a frame costs almost two steps
    assert budget.frame_steps == [0, 24] and budget.cadence == 25


def test_frames_made_on_another_thread_are_promised_then_paid():
    budget = PreviewBudget()
    budget.step_done(0.028)
    assert budget.wants(0, 10)  # the first frame measures the decoder
    budget.step_done(0.028)
    assert not budget.wants(1, 10)  # its cost is not in yet: no second frame is promised
    budget.frame_done(0.0015)
    for i in range(2, 9):
        budget.step_done(0.028)
        if budget.wants(i, 10):
            budget.frame_skipped(i)  # nobody watched: not made, not counted
    assert budget.frame_steps == [0] and budget.spent == pytest.approx(0.0015)
    budget.step_done(0.028)
    assert budget.wants(9, 10)  # the last step always gets its frame


@pytest.mark.parametrize("share", [0, -0.1, 1.5, True, "3%"])
def test_bad_share(share):
    with pytest.raises(ValueError, match="share must be a number in"):
        PreviewBudget(share)


# --- in a run ---


class FakeClock:
    """stepdiff.preview's clock, advanced by the steps and the decodes of a run instead of by the machine."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture(scope="module")
def shipped():
    pipe = stepdiff.AutoPipelineForText2Image.from_pretrained(stepdiff.default_model())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_auto_on_the_shipped_model_is_tiny_decoder_frames_at_the_chosen_steps(shipped, monkeypatch):
    import stepdiff.frames as frames
    import stepdiff.preview as preview
    from stepdiff.preview import load_tiny_decoder, rgb_to_image, tiny_decode, tiny_decoder_folder

    clock = FakeClock()
    monkeypatch.setattr(preview, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    real_decode = preview.tiny_decode

    def decode(decoder, latents):  # each decode (the warm-up too) "takes" 1.5 ms
        clock.now += 0.0015
        return real_decode(decoder, latents)

    monkeypatch.setattr(preview, "tiny_decode", decode)  # the warm-up's
    monkeypatch.setattr(frames, "tiny_decode", decode)  # render_frame's
    seen = {}

    def step(pipe, i, t, kw):  # runs before the preview: each step "takes" 28 ms
        clock.now += 0.028
        seen[i] = kw["denoised"][0].clone()
        return kw

    cb = PreviewCallback()  # the defaults: method auto, the steps chosen
    shipped("a red circle on a blue background", num_inference_steps=10, generator=gen(),
            callback_on_step_end=[step, cb], callback_on_step_end_tensor_inputs=["denoised"])
    assert cb.method == "auto" and cb.resolved_method == "tiny" and cb.budget is not None
    # The same times through the rule: the warm-up decode before the first frame, then 28 ms steps and 1.5 ms frames.
    expected = simulate([0.028] * 10, 0.0015, warmup=0.0015)
    assert cb.frame_steps == cb.budget.frame_steps == expected.frame_steps == [0, 3, 6, 9]
    assert cb.cadence == expected.cadence == 3 and cb.budget.measured_share <= PREVIEW_SHARE
    assert "tiny decoder, 4 of 10 steps (every 3rd step, chosen from this run's" in cb.describe(10)
    tiny = load_tiny_decoder(tiny_decoder_folder(shipped), shipped.latent_channels(), shipped.vae_scale_factor)
    for i, image in cb.frames:  # each frame is the tiny decoder's picture of that step's x0 estimate
        want = np.asarray(rgb_to_image(tiny_decode(tiny, seen[i][None])[0]), dtype=int)
        assert np.abs(np.asarray(image, dtype=int) - want).max() <= 1


@pytest.fixture(scope="module")
def with_tiny(sd_folder, tmp_path_factory):
    from stepdiff.testing import make_tiny_preview_decoder

    folder = shutil.copytree(sd_folder, tmp_path_factory.mktemp("auto") / "with-tiny")
    make_tiny_preview_decoder(folder / PREVIEW_DECODER_DIR, latent_channels=4, scale_factor=2)
    return folder


def _sd(folder):
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kwargs,method,steps", [
    (dict(method="tiny", every=3), "tiny", [0, 3, 6, 9]),  # a method and a cadence asked for: exactly those
    (dict(every=2), "tiny", [0, 2, 4, 6, 8, 9]),  # auto with a cadence: the tiny decoder at that cadence
    (dict(method="tiny"), "tiny", list(range(10))),  # the tiny decoder asked for by name: every step, as before
    (dict(method="linear"), "linear", list(range(10))),
])
def test_an_asked_cadence_is_kept(with_tiny, kwargs, method, steps):
    cb = PreviewCallback(**kwargs)
    _sd(with_tiny)("a cat", num_inference_steps=10, generator=gen(), callback_on_step_end=cb)
    assert cb.resolved_method == method and cb.budget is None and cb.frame_steps == steps


def test_auto_without_a_tiny_decoder_is_the_linear_table_at_every_step(sd_folder, with_tiny):
    cb = PreviewCallback()
    _sd(sd_folder)("a cat", num_inference_steps=4, generator=gen(), callback_on_step_end=cb)
    assert cb.resolved_method == "linear" and cb.budget is None and cb.frame_steps == [0, 1, 2, 3]
    assert cb.describe(4) == "linear table, 4 of 4 steps"
    cb = PreviewCallback()  # the same callback type on a model that ships a decoder: chosen steps
    _sd(with_tiny)("a cat", num_inference_steps=4, generator=gen(), callback_on_step_end=cb)
    assert cb.resolved_method == "tiny" and cb.budget is not None and cb.frame_steps[0] == 0 and cb.frame_steps[-1] == 3


def test_cli_says_what_the_previews_got(with_tiny, tmp_path, capsys):
    from stepdiff.cli import main

    base = ["generate", "a cat", "--steps", "6", "--model", str(with_tiny), "--overwrite", "--output",
            str(tmp_path / "x.png"), "--preview-dir"]
    assert main([*base, str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "stepdiff: previews: tiny decoder, " in err and "so that previews take <= 3% of it; measured" in err
    assert (tmp_path / "a" / "0.png").is_file() and (tmp_path / "a" / "5.png").is_file()
    assert main([*base, str(tmp_path / "b"), "--preview-method", "tiny", "--preview-every", "2"]) == 0
    assert "stepdiff: previews: tiny decoder, 4 of 6 steps (every 2nd step)" in capsys.readouterr().err
    assert sorted(int(p.stem) for p in (tmp_path / "b").glob("*.png")) == [0, 2, 4, 5]


def test_studio_auto_previews_with_the_models_tiny_decoder(with_tiny, tmp_path):
    from starlette.testclient import TestClient

    from stepdiff.studio import JobSpec, Studio, create_app
    from stepdiff.studio.server import limits_for

    assert JobSpec(prompt="x").preview.method == "auto" and JobSpec(prompt="x").preview.every is None
    studio = Studio(_sd(with_tiny), with_tiny, tmp_path / "data", limits=limits_for(with_tiny, 500))
    with TestClient(create_app(studio)) as client, client.websocket_connect("/api/events") as ws:
        assert ws.receive_json()["type"] == "hello"
        r = client.post("/api/jobs", json={"prompt": "a cat", "steps": 8})
        assert r.status_code == 201, r.text
        events = []
        while not events or events[-1]["type"] not in ("finished", "failed"):
            events.append(ws.receive_json())
    steps = [e for e in events if e["type"] == "step"]
    assert events[-1]["type"] == "finished" and steps and all(e["frame_method"] == "tiny" for e in steps)
    framed = [e["frame_step"] for e in steps if e["frame"]]
    print("frames at steps", framed)
    # frames come in step order; none at the last step (7): the finished image follows it at once
    assert framed and framed == sorted(framed) and 7 not in framed
    assert all("frame_every" in e for e in steps)  # the cadence chosen so far (None before the first frame's cost)
    studio.close()
