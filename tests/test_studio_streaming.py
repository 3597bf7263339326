"""What streaming previews costs a studio job, and how its budget answers: the whole cost of a frame (drawing it,
encoding it, handing it to the hub, writing it to every client) is charged to the job's ``StreamBudget``, so the
frames get sparser as clients are added; plain step events are spaced and charged too. No model: stand-ins."""

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from stepdiff.studio import JobSpec
from stepdiff.studio.events import EventHub, is_framed_step
from stepdiff.studio.previews import EVENT_GAP, Previewer, StepUpdate, StreamBudget
from stepdiff.studio.state import _Live
from stepdiff.studio.steering import GuidancePlan
from stepdiff.studio.worker import Workers


class _QuickFrames:
    """A frame maker whose frames cost next to nothing: what the budget is charged beyond them is delivery."""

    warmup_seconds = 0.0

    def resolve(self, method):
        return "tiny"

    def frame(self, latents, method):
        return Image.new("RGB", (8, 8))


@pytest.fixture
def hub_with_clients():
    loops = []

    def make(n):
        hub = EventHub()
        loop = asyncio.new_event_loop()
        loops.append(loop)
        subs = [hub.subscribe(loop) for _ in range(n)]
        return hub, subs

    yield make
    for loop in loops:
        loop.close()


def test_delivery_is_one_write_times_the_clients(hub_with_clients):
    hub, _ = hub_with_clients(10)
    assert hub.delivery_seconds(True) == 0.0  # nothing measured yet
    for _ in range(3):
        hub.sent(0.002, True)
    hub.sent(0.0005, False)
    assert hub.delivery_seconds(True) == pytest.approx(0.02)
    assert hub.delivery_seconds(False) == pytest.approx(0.005)
    assert hub.audience() == {"clients": 10, "framed": pytest.approx(0.02), "plain": pytest.approx(0.005)}
    assert is_framed_step('{"type": "step", "job": "a", "frame": "data:image/webp;base64,AAAA"}') == (True, True)
    assert is_framed_step('{"type": "step", "job": "a", "frame": null}') == (True, False)
    assert is_framed_step('{"type": "finished", "job": "a"}') == (False, False)


@pytest.mark.parametrize("clients", [1, 10])
def test_a_frame_is_charged_its_sending_to_every_client(hub_with_clients, clients):
    hub, _ = hub_with_clients(clients)
    hub.sent(0.004, True)  # one write of a framed step event took 4 ms
    hub.sent(0.001, False)
    previewer = Previewer(hub, _QuickFrames())  # type: ignore[arg-type]
    try:
        budget = StreamBudget()
        budget.step_done(0.04)
        assert budget.wants(0, 20)
        previewer.offer(StepUpdate(job="a", step=0, total=20, timestep=999.0, rows=2, model_rows=2, guidance=7.5,
                                   tensor=torch.zeros(4, 8, 8), frame_step=0, budget=budget))
        previewer.flush("a")
        budget.step_done(0.04)
        previewer.offer(StepUpdate(job="a", step=1, total=20, timestep=950.0, rows=2, model_rows=4, guidance=7.5,
                                   budget=budget))
        previewer.flush("a")
    finally:
        previewer.close()
    assert len(budget.frame_seconds) == 1
    assert budget.frame_seconds[0] >= clients * 0.004  # the frame's cost includes writing it to each client
    assert budget.overhead_spent >= clients * 0.001  # and a plain step event its writes
    assert budget.spent >= budget.frame_seconds[0] + budget.overhead_spent - 1e-9


def _stream(budget, steps, step_seconds, frame_seconds, event_seconds):
    """A run as the worker drives it: per step its time, its frame if the budget wants one, its event's cost."""
    frames = []
    for i in range(steps):
        budget.step_done(step_seconds)
        if budget.wants(i, steps):
            frames.append(i)
            budget.frame_done(frame_seconds)
        else:
            budget.overhead(event_seconds)
    return frames


def test_cadence_widens_with_the_clients_and_the_share_holds():
    step, draw, write, event = 0.043, 0.003, 0.0008, 0.00005  # seconds: a step, drawing a frame, one write, an event
    frames, shares = {}, {}
    for n in (1, 10):
        budget = StreamBudget()
        frames[n] = _stream(budget, 200, step, draw + n * write, n * event)
        shares[n] = budget.measured_share
    assert frames[1][0] == 0 and frames[10][0] == 0  # the first step always gets a frame (a preview at once)
    assert len(frames[10]) < len(frames[1]) and len(frames[10]) >= 3  # sparser with 10 clients, still frames
    assert shares[1] <= 0.03 + 1e-6 and shares[10] <= 0.03 + 1e-6, shares
    assert 199 not in frames[1]  # no frame at the last step: the job's image follows at once


def test_step_events_alone_over_the_share_leave_only_the_first_frame():
    budget = StreamBudget()
    frames = _stream(budget, 50, 0.01, 0.001, 0.002)  # each plain step event costs 20% of a step
    assert frames == [0]
    assert budget.steady_cadence() == 1 << 30


def _workers(previewer):
    return SimpleNamespace(hub=SimpleNamespace(listening=True), previewer=previewer, offer_seconds=0.0,
                           offered_steps=0)


def test_plain_step_events_are_spaced_frames_and_the_last_step_are_not():
    offered = []
    host = _workers(SimpleNamespace(offer=offered.append))
    live = _Live("a" * 32, JobSpec(prompt="x", steps=6))
    live.plan = GuidancePlan(7.5, 6)
    for i in range(6):
        tensor = torch.zeros(4, 8, 8) if i == 3 else None
        Workers._offer(host, live, i, 6, 999.0 - i, 2, i + 1, 2 * (i + 1), 7.5, tensor)
    assert [u.step for u in offered] == [0, 3, 5]  # within EVENT_GAP: step 0, the frame of step 3, the last step
    assert live.steps_completed == 6  # the counters follow every step
    live.last_event = time.perf_counter() - EVENT_GAP
    Workers._offer(host, live, 0, 6, 999.0, 2, 1, 2, 7.5, None)
    assert len(offered) == 4  # once EVENT_GAP has passed, a plain step event goes out again


def _contended(budget, steps, step_seconds, frame_cpu, slowdown):
    """As ``_stream``, with the frame made during the next step, which it slows by ``slowdown`` seconds."""
    frames, seen, making = [], None, False
    for i in range(steps):
        budget.step_done(step_seconds + (slowdown if making else 0.0), seen)
        if making:
            budget.making(False)
            making = False
        if budget.wants(i, steps):
            frames.append(i)
            budget.making(True)  # on the preview thread, while the next step runs
            budget.frame_done(frame_cpu)
            making = True
        seen = budget.mark()
    return frames


def test_contention_with_the_steps_is_charged_to_the_frames():
    step, cpu = 0.04, 0.002
    calm, contended = StreamBudget(), StreamBudget()
    calm_frames = _contended(calm, 300, step, cpu, 0.0)
    slow_frames = _contended(contended, 300, step, cpu, 0.012)  # each frame slows the step it overlaps by 12 ms
    assert calm.contention == pytest.approx(0.0, abs=1e-9)
    assert contended.contention == pytest.approx(0.012 * len(slow_frames), rel=0.05)
    assert len(slow_frames) < len(calm_frames) / 3  # the cadence widens for what the frames really cost
    assert contended.measured_share <= 0.03 + 1e-6
    wall = sum(contended.step_seconds) + contended.contention  # the steps' real time, contention included
    assert wall == pytest.approx(300 * step + 0.012 * len(slow_frames))
