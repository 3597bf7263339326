"""One formula for "is guidance on at step i" (stepdiff.guidance): analytic checks of the windows, and the same
rows per step through every caller that decides it, over the run's real number of model steps (Heun and KDPM2
run 2 * steps - 1 model steps)."""

import time

import pytest
from diffusers import HeunDiscreteScheduler, KDPM2DiscreteScheduler

import stepdiff
from stepdiff.callbacks import CFGCutoffCallback, GuidanceIntervalCallback
from stepdiff.guidance import GuidanceWindow, control_window, skip_layer_window, step_of


def test_step_of_is_the_classic_int_of_the_product():
    assert [step_of(10, r) for r in (0.0, 0.29, 0.3, 0.5, 0.99, 1.0)] == [0, 2, 3, 5, 9, 10]
    assert step_of(19, 0.5) == 9  # Heun, 10 steps: 19 model steps


@pytest.mark.parametrize("n", [1, 6, 10, 19, 49])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_cutoff_window_guides_through_the_cutoff_step(n, ratio):
    on = [GuidanceWindow(cutoff=ratio).guided(i, n) for i in range(n)]
    assert on == [i <= int(n * ratio) for i in range(n)]


def test_interval_replaces_a_cutoff_and_the_gate_wins():
    window = GuidanceWindow(cutoff=0.1, interval=(0.2, 0.6))
    assert [window.guided(i, 10) for i in range(10)] == [i in (2, 3, 4, 5) for i in range(10)]
    gated = GuidanceWindow(interval=(0.2, 0.6), gate=4)
    assert [gated.scale_at(7.5, i, 10) for i in range(10)] == [7.5 if i in (2, 3) else 0.0 for i in range(10)]
    assert [GuidanceWindow().guided(i, 5) for i in range(5)] == [True] * 5


def test_skip_layer_and_control_windows_keep_the_classic_boundaries():
    # SD3's skip-layer guidance: strictly inside (n * start, n * stop)
    assert [i for i in range(10) if skip_layer_window(i, 10, 0.01, 0.2)] == [1]
    # ControlNet: the step's span [i, i + 1) / n inside [start, end]; 0.3 * 10 is 3.0000000000000004 in floats,
    # and the classic i / n < start keeps step 3
    assert [i for i in range(10) if control_window(i, 10, 0.3, 0.5)] == [3, 4]


@pytest.fixture(scope="module")
def sd_pipe(sd_folder):
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", [HeunDiscreteScheduler, KDPM2DiscreteScheduler])
def test_second_order_cutoff_counts_model_steps(sd_pipe, scheduler):
    """With Heun, 10 steps are 19 model steps: a 0.5 cutoff guides the first 10 of them, not the first 5 or 6."""
    pipe = stepdiff.StableDiffusionPipeline(**sd_pipe.components)
    pipe.scheduler = scheduler.from_config(sd_pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", num_inference_steps=10, height=32, width=32, output_type="latent",
               callback_on_step_end=CFGCutoffCallback(cutoff_step_ratio=0.5))
    assert out.record.rows_per_step == [2] * 10 + [1] * 9
    out = pipe("a cat", num_inference_steps=10, height=32, width=32, output_type="latent",
               callback_on_step_end=GuidanceIntervalCallback(0.2, 0.6))
    window = GuidanceWindow(interval=(0.2, 0.6))
    assert out.record.rows_per_step == [2 if window.guided(i, 19) else 1 for i in range(19)]


@pytest.mark.parametrize("fields", [dict(cfg_cutoff=0.5), dict(guidance_interval=[0.2, 0.6]), dict(fast=True)])
def test_the_studio_plan_counts_model_steps_as_the_callbacks(sd_pipe, sd_folder, tmp_path, fields):
    """A Heun job in the studio: the same rows per step as the library's callbacks on the same run (the plan used
    to index the requested steps: a 0.5 cutoff stopped guidance after about 28% of the run)."""
    from starlette.testclient import TestClient

    from stepdiff.caching import fast_preset
    from stepdiff.studio import Studio, create_app
    from stepdiff.studio.server import limits_for

    studio = Studio(sd_pipe, sd_folder, tmp_path / "data", limits=limits_for(sd_folder, 500))
    with TestClient(create_app(studio)) as client:
        r = client.post("/api/jobs", json={"prompt": "a cat", "steps": 10, "width": 32, "height": 32, "guidance": 7.5,
                                           "scheduler": "heun", **fields})
        assert r.status_code == 201, r.text
        job = r.json()
        for _ in range(6000):
            job = client.get(f"/api/jobs/{job['id']}").json()
            if job["state"] not in ("queued", "running"):
                break
            time.sleep(0.01)
    assert job["state"] == "finished", job
    callback = (CFGCutoffCallback(cutoff_step_ratio=0.5) if "cfg_cutoff" in fields else
                GuidanceIntervalCallback(0.2, 0.6) if "guidance_interval" in fields else fast_preset(10))
    pipe = stepdiff.StableDiffusionPipeline(**sd_pipe.components)
    pipe.scheduler = HeunDiscreteScheduler.from_config(sd_pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", num_inference_steps=10, height=32, width=32, guidance_scale=7.5, output_type="latent",
               callback_on_step_end=callback)
    window = GuidanceWindow(cutoff=fields.get("cfg_cutoff", 0.3 if "fast" in fields else None),
                            interval=fields.get("guidance_interval"))
    assert out.record.rows_per_step == [2 if window.guided(i, 19) else 1 for i in range(19)]  # 19 model steps
    assert job["record"]["rows_per_step"] == out.record.rows_per_step
