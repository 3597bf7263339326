"""Guidance schedules: the rows computed per step follow the schedule; guidance comes back with the
original negative conditioning; bad settings fail before any model call."""

import math

import pytest
import torch

from stepdiff.callbacks import (
    GuidanceIntervalCallback,
    GuidanceScheduleCallback,
    cosine_ramp,
    linear_ramp,
)

from .conftest import gen


def rows_for(scales, batch=1):
    return [2 * batch if s > 1 else batch for s in scales]


def run(pipe, cb, steps=10, **kwargs):
    kwargs.setdefault("prompt", "a cat")
    return pipe(num_inference_steps=steps, generator=gen(), guidance_scale=6.0, callback_on_step_end=cb, **kwargs)


@pytest.mark.parametrize("cb,expected_on", [
    (GuidanceIntervalCallback(start_ratio=0.2, end_ratio=0.8), range(2, 8)),
    (GuidanceIntervalCallback(start_step=3, end_step=5), range(3, 5)),
    (GuidanceIntervalCallback(end_ratio=0.5), range(0, 5)),
    (GuidanceIntervalCallback(start_ratio=0.7), range(7, 10)),
])
def test_interval_rows_per_step(pipe, count_calls, cb, expected_on):
    calls = count_calls(pipe)
    out = run(pipe, cb)
    expected = [2 if i in expected_on else 1 for i in range(10)]
    assert calls.rows == expected and out.record.rows_per_step == expected
    assert out.record.model_rows == sum(expected)


def test_interval_for_any_batch(sdxl_pipe, count_calls):
    calls = count_calls(sdxl_pipe)
    run(sdxl_pipe, GuidanceIntervalCallback(start_ratio=0.2, end_ratio=0.8), prompt=["a cat", "a dog"],
        num_images_per_prompt=2)
    assert calls.rows == [4, 4, 8, 8, 8, 8, 8, 8, 4, 4]


def test_interval_scale_is_used_inside(sd_pipe):
    seen = []

    def spy(p, i, t, kw):
        seen.append(p.guidance_scale)
        return kw

    run(sd_pipe, [GuidanceIntervalCallback(start_step=2, end_step=4, scale=3.5), spy], steps=6)
    # spy sees the scale the interval set for the *next* step (it runs after the interval callback)
    assert seen == [0.0, 3.5, 3.5, 0.0, 0.0, 0.0]


def test_full_interval_equals_plain_cfg_and_empty_equals_no_guidance(sd_pipe):
    plain = sd_pipe("a cat", num_inference_steps=6, generator=gen(), guidance_scale=6.0, output_type="latent").images
    full = run(sd_pipe, GuidanceIntervalCallback(start_ratio=0.0, end_ratio=1.0), steps=6, output_type="latent").images
    assert torch.equal(plain, full)
    no_cfg = sd_pipe("a cat", num_inference_steps=6, generator=gen(), guidance_scale=1.0, output_type="latent").images
    empty = run(sd_pipe, GuidanceIntervalCallback(start_step=0, end_step=0), steps=6, output_type="latent").images
    assert torch.equal(no_cfg, empty)


def test_guidance_back_on_uses_original_negative(sd_pipe, count_calls):
    calls = count_calls(sd_pipe)
    run(sd_pipe, GuidanceScheduleCallback([6, 6, 0, 0, 6, 6]), steps=6, negative_prompt="a dog")
    assert calls.rows == [2, 2, 1, 1, 2, 2]
    assert torch.equal(calls.hidden[4], calls.hidden[0])  # [uncond; cond] rows identical to step 0's


@pytest.mark.parametrize("schedule", [
    [7.0, 7.0, 5.0, 3.0, 1.0, 1.0, 0.5, 0.0, 2.0, 8.0],
    linear_ramp(7.0, 1.0),
    cosine_ramp(1.0, 9.0),
    lambda i, n, t: 5.0 if float(t) > 500 else 1.0,
])
def test_schedule_rows_per_step(sd_pipe, count_calls, schedule):
    calls = count_calls(sd_pipe)
    out = run(sd_pipe, GuidanceScheduleCallback(schedule))
    ts = sd_pipe.timesteps
    scales = schedule if isinstance(schedule, list) else [schedule(i, 10, ts[i]) for i in range(10)]
    assert calls.rows == rows_for(scales) and out.record.rows_per_step == rows_for(scales)


def test_ramps_are_analytic():
    lin, cos = linear_ramp(7.0, 1.0), cosine_ramp(1.0, 9.0)
    assert [lin(i, 4, None) for i in range(4)] == [7.0, 5.0, 3.0, 1.0]
    assert cos(0, 5, None) == 1.0 and math.isclose(cos(2, 5, None), 5.0) and math.isclose(cos(4, 5, None), 9.0)


@pytest.mark.parametrize("make,message", [
    (lambda: GuidanceIntervalCallback(start_ratio=0.8, end_ratio=0.2), r"start_ratio \(0.8\) must not be after end_ratio \(0.2\)"),
    (lambda: GuidanceIntervalCallback(start_step=5, end_step=2), r"start_step \(5\) must not be after end_step \(2\)"),
    (lambda: GuidanceIntervalCallback(start_ratio=-0.1), r"start_ratio must be a number in \[0, 1\]"),
    (lambda: GuidanceIntervalCallback(end_ratio=1.5), r"end_ratio must be a number in \[0, 1\]"),
    (lambda: GuidanceIntervalCallback(start_ratio=float("nan")), r"start_ratio must be a number in \[0, 1\]"),
    (lambda: GuidanceIntervalCallback(start_ratio=0.1, start_step=1), "start_ratio or start_step, not both"),
    (lambda: GuidanceIntervalCallback(scale=-2.0), "scale must be a finite number >= 0"),
    (lambda: GuidanceScheduleCallback([7.0, -1.0]), r"schedule\[1\] must be a finite number >= 0"),
    (lambda: GuidanceScheduleCallback("fast"), "schedule must be a list of scales or a function"),
    (lambda: linear_ramp(-1.0, 2.0), "start_scale must be a finite number >= 0"),
])
def test_bad_schedule_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_schedule_length_checked_before_model_calls(sd_pipe, count_calls):
    calls = count_calls(sd_pipe)
    with pytest.raises(ValueError, match="schedule has 3 scales but this run has 10 steps"):
        run(sd_pipe, GuidanceScheduleCallback([7.0, 7.0, 7.0]))
    assert calls.calls == 0


def test_interval_steps_beyond_run_checked_at_start(sd_pipe, count_calls):
    calls = count_calls(sd_pipe)
    with pytest.raises(ValueError, match="guidance interval starts at step 8, after its end at step 5"):
        run(sd_pipe, GuidanceIntervalCallback(start_step=8, end_ratio=0.5))
    assert calls.calls == 0


def test_schedule_function_returning_non_number(sd_pipe):
    with pytest.raises(ValueError, match="schedule function at step 0 must be a number, got 'high'"):
        run(sd_pipe, GuidanceScheduleCallback(lambda i, n, t: "high"))
    with pytest.raises(ValueError, match=r"schedule function at step 3 must be a finite number >= 0, got nan"):
        run(sd_pipe, GuidanceScheduleCallback(lambda i, n, t: float("nan") if i == 3 else 5.0))
