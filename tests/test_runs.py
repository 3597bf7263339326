"""Runs: prepare -> steps -> finish, the public step iterator, and runs that are safe across threads."""

import threading

import numpy as np
import pytest
import torch

from stepdiff import CancelToken
from stepdiff.callbacks import CFGCutoffCallback
from stepdiff.guidance import ClassifierFreeGuidance, DistilledGuidance
from stepdiff.loop import LoopState, denoise

from .conftest import gen

STEPS = 4


def _kwargs(seed=0, **kw):
    return dict(prompt="a photo of a cat", num_inference_steps=STEPS, output_type="np", generator=gen(seed), **kw)


@pytest.fixture(params=["sd", "sdxl", "sd3"])
def any_pipe(request, sd_pipe, sdxl_pipe, sd3_pipe):
    return {"sd": sd_pipe, "sdxl": sdxl_pipe, "sd3": sd3_pipe}[request.param]


def test_step_iterator_gives_the_images_of_call(any_pipe):
    expected = any_pipe(**_kwargs()).images
    run = any_pipe.steps(**_kwargs())
    seen = [(state.step_index, state.denoised.clone()) for state in run]
    out = run.finish()
    assert [i for i, _ in seen] == list(range(STEPS))
    assert np.array_equal(out.images, expected)
    assert out.record.steps_completed == STEPS and not out.interrupted
    assert run.finish() is out  # finish is idempotent


def test_step_iterator_takes_positional_arguments(sd_pipe):
    run = sd_pipe.steps("a photo of a cat", None, None, STEPS, output_type="np", generator=gen())
    assert run.num_timesteps == STEPS


def test_breaking_out_gives_the_clean_image_of_that_step(sd_pipe):
    def stop_at_1(p, i, t, kw):
        if i == 1:
            p._interrupt = True
        return kw

    expected = sd_pipe(**_kwargs(callback_on_step_end=stop_at_1))
    run = sd_pipe.steps(**_kwargs())
    for state in run:
        if state.step_index == 1:
            break
    out = run.finish()
    assert out.interrupted and out.steps_completed == 2 and out.stop_reason == "stopped by caller"
    assert np.array_equal(out.images, expected.images)


def test_a_run_iterates_once(sd_pipe):
    run = sd_pipe.steps(**_kwargs())
    list(run)
    with pytest.raises(RuntimeError, match="iterated once"):
        iter(run)


def test_run_guidance_can_be_steered_between_steps(sd_pipe):
    run = sd_pipe.steps(**_kwargs(guidance_scale=7.5))
    for state in run:
        if state.step_index == 1:
            run.guidance_scale = 0.0
    assert run.finish().record.rows_per_step == [2, 2, 1, 1]
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        run.guidance_scale = float("inf")


def test_scheduler_of_the_pipeline_is_not_touched(sd_pipe):
    before = sd_pipe.scheduler.timesteps.clone()
    sd_pipe(**_kwargs())
    assert torch.equal(sd_pipe.scheduler.timesteps, before)


def _in_threads(fns):
    results, errors = [None] * len(fns), []

    def target(k):
        try:
            results[k] = fns[k]()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(k,)) for k in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def test_two_threads_on_one_pipeline_get_their_own_images(any_pipe):
    """One thread stops itself at step 1 and the other turns guidance off at step 0; neither reaches the other."""
    barrier = threading.Barrier(2, timeout=60)

    def stopper(p, i, t, kw):
        if i == 0:
            barrier.wait()  # both runs are in flight at once
        if i == 1:
            p._interrupt = True
        return kw

    def steerer(p, i, t, kw):
        if i == 0:
            barrier.wait()
            p._guidance_scale = 0.0
        return kw

    alone_stop = any_pipe(**_kwargs(1, callback_on_step_end=lambda p, i, t, kw: (setattr(p, "_interrupt", i == 1) or kw)))
    alone_steer = any_pipe(**_kwargs(2, callback_on_step_end=lambda p, i, t, kw: (i == 0 and setattr(p, "_guidance_scale", 0.0)) or kw))
    a, b = _in_threads([
        lambda: any_pipe(**_kwargs(1, callback_on_step_end=stopper)),
        lambda: any_pipe(**_kwargs(2, callback_on_step_end=steerer)),
    ])
    assert a.interrupted and a.steps_completed == 2
    assert not b.interrupted and b.record.rows_per_step == [2, 1, 1, 1]
    assert np.array_equal(a.images, alone_stop.images)
    assert np.array_equal(b.images, alone_steer.images)


def test_seed_document_interrupt_example_in_one_thread_leaves_the_other_alone(sd_pipe):
    def interrupt_callback(pipeline, i, t, callback_kwargs):
        stop_idx = 1
        if i == stop_idx:
            pipeline._interrupt = True
        return callback_kwargs

    full = sd_pipe(**_kwargs(3)).images
    results = _in_threads([
        lambda: sd_pipe(**_kwargs(4, callback_on_step_end=interrupt_callback)),
        lambda: sd_pipe(**_kwargs(3, callback_on_step_end=CFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=10))),
    ])
    assert results[0].interrupted and results[0].steps_completed == 2
    assert not results[1].interrupted and np.array_equal(results[1].images, full)


def test_cancel_reaches_only_its_run(sd_pipe):
    token = CancelToken()
    started = threading.Event()

    def wait_then_continue(p, i, t, kw):
        if i == 0:
            started.set()
        return kw

    def cancel_other(p, i, t, kw):
        if i == 0:
            started.wait(60)
            token.cancel("user pressed stop")
        return kw

    cancelled, other = _in_threads([
        lambda: sd_pipe(**_kwargs(cancel=token, callback_on_step_end=wait_then_continue)),
        lambda: sd_pipe(**_kwargs(callback_on_step_end=cancel_other)),
    ])
    assert not other.interrupted
    assert cancelled.stop_reason == "user pressed stop" or not cancelled.interrupted  # it may have finished first


def test_classic_attributes_read_after_a_call(sd_pipe):
    def bump(p, i, t, kw):
        p._guidance_scale += 1
        return kw

    sd_pipe(**_kwargs(guidance_scale=3.0, callback_on_step_end=bump))
    assert sd_pipe.guidance_scale == 3.0 + STEPS and sd_pipe.num_timesteps == STEPS


def test_stop_outside_a_callback_points_to_cancel_tokens(sd_pipe):
    with pytest.raises(RuntimeError, match="CancelToken"):
        sd_pipe.stop()


# ---------------------------------------------------------------- the loop alone, with a toy model


class ToyScheduler:
    """x_{t-1} = x_t - 0.1 * output; reports no x0, so the loop estimates it."""

    config = {"prediction_type": "sample"}  # noqa: RUF012
    alphas_cumprod = torch.full((10,), 0.5)

    def scale_model_input(self, x, t):
        return x

    def step(self, output, t, latents, return_dict=True):
        from types import SimpleNamespace

        return SimpleNamespace(prev_sample=latents - 0.1 * output, pred_original_sample=None)


def test_loop_asks_guidance_for_sides_and_combines():
    calls = []

    def model(x, t, cond):
        calls.append((x.shape[0], cond["c"][:, 0].tolist()))
        return cond["c"][:, :1, None, None].expand(x.shape[0], 1, 2, 2) + 0 * x  # output = the row's conditioning

    state = LoopState(latents=torch.zeros(2, 1, 2, 2), cond={"c": torch.tensor([[1.0], [2.0]])},
                      uncond={"c": torch.tensor([[0.0], [0.0]])}, guidance_scale=3.0)
    guidance = ClassifierFreeGuidance(3.0)
    states = []
    for s in denoise(state, torch.tensor([3, 2, 1]), ToyScheduler(), model, {}, lambda: False, guidance):
        states.append(s.latents.clone())
        if s.step_index == 0:
            guidance.scale = 1.0
    assert [c[0] for c in calls] == [4, 2, 2]
    assert calls[0][1] == [0.0, 0.0, 1.0, 2.0]  # uncond rows first
    # step 0: uncond 0 + 3 * (cond - 0) = 3c; then c, c: latents = -0.1 * (3c + c + c)
    assert torch.allclose(states[-1][:, 0, 0, 0], torch.tensor([-0.5, -1.0]))
    assert state.rows_per_step == [4, 2, 2] and state.model_rows == 8


def test_loop_stops_before_the_next_model_call_and_runs_after_step():
    stop = {"now": False}
    seen = []
    state = LoopState(latents=torch.zeros(1, 1, 2, 2), cond={"c": torch.ones(1, 1)}, uncond={"c": torch.zeros(1, 1)},
                      guidance_scale=1.0)
    loop = denoise(state, torch.tensor([3, 2, 1]), ToyScheduler(), lambda x, t, c: torch.ones_like(x), {},
                   lambda: stop["now"], DistilledGuidance(8.0), after_step=lambda s: seen.append(s.step_index))
    for _ in loop:
        stop["now"] = True
    assert state.model_calls == 1 and seen == [0] and state.rows_per_step == [1]


def test_a_run_can_have_its_own_scheduler(sd_pipe, count_calls):
    """``steps(..., scheduler=)``: this run only; the pipeline's scheduler is neither replaced nor stepped."""
    from diffusers import DDIMScheduler

    own = sd_pipe.scheduler
    ddim = DDIMScheduler.from_config(own.config)
    a = sd_pipe.steps(**_kwargs(), scheduler=ddim).run()
    assert sd_pipe.scheduler is own
    sd_pipe.scheduler = DDIMScheduler.from_config(own.config)
    try:
        b = sd_pipe(**_kwargs())
    finally:
        sd_pipe.scheduler = own
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, sd_pipe(**_kwargs()).images)  # the pipeline's own (Euler) differs
    calls = count_calls(sd_pipe)
    with pytest.raises(TypeError, match="scheduler must be a diffusers scheduler .* got str"):
        sd_pipe.steps(**_kwargs(), scheduler="ddim")
    assert calls.calls == 0


def test_steps_run_without_autograd_and_callbacks_in_the_callers_mode(sd_pipe):
    """Each step's own work (model call, guidance, scheduler step) runs under ``torch.no_grad``, as the classic
    pipelines' whole ``__call__`` does: latents a callback returned with ``requires_grad`` come out of the next
    scheduler step without it. The callback itself runs in the caller's grad mode (a callback may use autograd)."""
    modes, grads = [], []

    def callback(pipe, i, t, kw):
        modes.append(torch.is_grad_enabled())
        grads.append(kw["latents"].requires_grad)
        return {"latents": kw["latents"].detach().clone().requires_grad_(True)} if i == 0 else kw

    sd_pipe("a cat", num_inference_steps=3, generator=gen(), output_type="latent", callback_on_step_end=callback)
    assert modes == [True, True, True]
    assert grads == [False, False, False]  # step 1's latents came from step 0's grad-requiring ones


def test_threads_sharing_a_pipeline_take_turns_with_its_tokenizers(sdxl_pipe):
    """A fast tokenizer keeps a call's padding and truncation on the shared object between setting them and encoding
    (transformers issue #47085): two threads tokenizing at once could encode with each other's settings (a
    7-token prompt concatenated with a 77-token one). stepdiff tokenizes under one lock: no two tokenizer calls
    overlap, even when each is slow."""
    import time

    active, overlaps = {}, []  # thread -> depth of its tokenizer calls (a call may make nested ones)

    def slow(method):
        def call(self, *args, **kwargs):
            me = threading.get_ident()
            if any(depth for thread, depth in list(active.items()) if thread != me):
                overlaps.append(method)
            active[me] = active.get(me, 0) + 1
            time.sleep(0.005)  # widen the window a race needs
            try:
                return getattr(super(type(self), self), method)(*args, **kwargs)
            finally:
                active[me] -= 1
        return call

    for tok in (sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2):
        tok.__class__ = type("Slow" + type(tok).__name__, (type(tok),),
                             {"__call__": slow("__call__"), "tokenize": slow("tokenize"), "decode": slow("decode")})
    prompts = ["a cat", "a red dog on a blue mat under the sky"]
    a, b = _in_threads([lambda p=p: sdxl_pipe(**{**_kwargs(1), "prompt": p}) for p in prompts])
    assert overlaps == []
    for out, prompt in zip((a, b), prompts):  # and each thread got its own prompt's image
        alone = sdxl_pipe(**{**_kwargs(1), "prompt": prompt})
        np.testing.assert_array_equal(out.images, alone.images)
