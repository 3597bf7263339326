"""What a running job can be steered by, from its next step on: the guidance scale, its CFG cutoff or guidance
interval, the ControlNet scale, the IP-Adapter scale, and its step caching: DeepCache's interval
(``cache_interval``, 1: every step in full) and First-Block-Cache's threshold (``cache_threshold``, 0: no reuse).

A compute policy is steered only where the job uses it (its ``cache``, or ``fast``: DeepCache) and only where a new
value is safe from any step: both read their setting afresh at every model call and keep their caches valid. T-GATE
(its gate caches the cross-attention of one step and turns guidance off for good) and adaptive guidance (which ends
guidance for good once the two predictions agree) cannot be undone mid-run, and no policy can be added to a running
job (it would wrap the shared model's blocks mid-run): those are not steer fields.

A ``GuidancePlan`` holds a job's values; the worker (or the Ray actor) asks it before every step
(``plan.apply(run, step)``), and ``POST /api/jobs/{id}/steer`` changes it under its lock. Every change is recorded
with the first step it can reach.
"""

from __future__ import annotations

import threading
from typing import Any

from ..cache_options import gate_step
from ..caching import DeepCacheCallback, FirstBlockCacheCallback
from ..guidance import GuidanceWindow
from ..request import check_control_scale, check_number, parse_interval
from .fields import check_ip_adapter_scale
from .spec import MAX_GUIDANCE, FieldError, _int, _unknown

__all__ = ["STEER_FIELDS", "GuidancePlan", "parse_steer"]

STEER_FIELDS = ("guidance", "cfg_cutoff", "guidance_interval", "control_scale", "ip_adapter_scale", "cache_interval",
                "cache_threshold")
MAX_CACHE_INTERVAL = 50
# The steer fields of the compute policies: (the policy class, its state's attribute, what a job without it is told).
_POLICY_FIELDS = {
    "cache_interval": (DeepCacheCallback, "interval", 'DeepCache (submit it with fast, or cache "deepcache:N")'),
    "cache_threshold": (FirstBlockCacheCallback, "threshold", 'First-Block-Cache (submit it with cache "fbc:T")'),
}


class GuidancePlan:
    """The guidance scale of every step of one job, steerable while it runs (and the ControlNet and IP-Adapter
    scales, for a job that has them).

    ``cfg_cutoff``, ``interval`` and ``gate`` (or ``policies`` that set one: T-GATE, the fast preset's cutoff) make a
    ``stepdiff.guidance.GuidanceWindow``, the formula of ``CFGCutoffCallback`` and ``GuidanceIntervalCallback``,
    over ``total``: the run's model steps, set once the run has started. Off-guidance steps compute only the
    conditional rows. ``control_scale`` / ``ip_adapter_scale``: None for a job without a ControlNet / IP-Adapter.
    """

    def __init__(self, scale: float, total: int, cfg_cutoff: float | None = None,
                 interval: tuple[float, float] | None = None, gate: int | None = None,
                 control_scale: float | None = None, ip_adapter_scale: float | None = None,
                 policies: list[Any] | tuple[Any, ...] = ()) -> None:
        self.lock = threading.Lock()
        self.scale, self.total, self.cfg_cutoff, self.interval = scale, total, cfg_cutoff, interval
        self.gate, self.policies = gate, list(policies)  # a fixed gate, and the policies that set one
        self.control_scale, self.ip_adapter_scale = control_scale, ip_adapter_scale
        # the steerable compute policies' settings (None: the job does not use the policy)
        self.cache_interval = next((p.cache_interval for p in policies if isinstance(p, DeepCacheCallback)), None)
        self.cache_threshold = next((p.threshold for p in policies if isinstance(p, FirstBlockCacheCallback)), None)

    def window(self) -> GuidanceWindow:
        """When guidance is on: the library's one formula (stepdiff.guidance) over the run's ``total`` model steps,
        the same as the callbacks count (2 * steps - 1 with Heun or KDPM2)."""
        gates = [g for g in (self.gate, gate_step(self.policies, self.total)) if g is not None]
        return GuidanceWindow(self.cfg_cutoff, self.interval, min(gates) if gates else None)

    def scale_at(self, step: int) -> float:
        return self.window().scale_at(self.scale, step, self.total)

    def apply(self, run: Any, step: int) -> None:
        """Set ``run``'s values for ``step`` (the next one); call under ``lock``."""
        if step >= self.total:
            return
        run.guidance_scale = self.scale_at(step)
        control = run.extras.control
        if control is not None and self.control_scale is not None:
            control.scales = [self.control_scale] * len(control.scales)
        if self.ip_adapter_scale is not None and run.extras.ip_adapter_scales is not None:
            run.extras.ip_adapter_scales = {n: [self.ip_adapter_scale] * len(v)
                                               for n, v in run.extras.ip_adapter_scales.items()}
        compute = getattr(run, "compute", None)
        for state in compute.states if compute is not None else ():
            for name, (policy, attribute, _) in _POLICY_FIELDS.items():  # read at each model call: the next step's
                if isinstance(state.policy, policy) and getattr(self, name) is not None:
                    setattr(state, attribute, getattr(self, name))

    def change(self, changes: dict[str, Any]) -> None:
        """Apply checked ``changes`` (``parse_steer``); call under ``lock``. A field the job does not use is a
        ``FieldError``, and nothing is changed."""
        for name in ("control_scale", "ip_adapter_scale"):
            if name in changes and getattr(self, name) is None:
                what = "ControlNet (no control picture)" if name == "control_scale" else "IP-Adapter"
                raise FieldError(name, changes[name], f"left out: this job uses no {what}")
        for name, (_, _, what) in _POLICY_FIELDS.items():
            if name in changes and getattr(self, name) is None:
                raise FieldError(name, changes[name], f"left out: this job uses no {what}; step caching cannot be "
                                                      "added to a running job")
        if "guidance" in changes:
            self.scale = changes["guidance"]
        if "cfg_cutoff" in changes:
            self.cfg_cutoff = changes["cfg_cutoff"]
            if self.cfg_cutoff is not None:
                self.interval = None
        if "guidance_interval" in changes:
            self.interval = changes["guidance_interval"]
            if self.interval is not None:
                self.cfg_cutoff = None
        for name in ("control_scale", "ip_adapter_scale", *_POLICY_FIELDS):
            if name in changes:
                setattr(self, name, changes[name])

    def values(self) -> dict[str, Any]:
        out: dict[str, Any] = {"guidance": self.scale, "cfg_cutoff": self.cfg_cutoff,
                               "guidance_interval": None if self.interval is None else list(self.interval)}
        if self.control_scale is not None:
            out["control_scale"] = self.control_scale
        for name in ("ip_adapter_scale", *_POLICY_FIELDS):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def parse_steer(body: Any) -> dict[str, Any]:
    """The changes a steer request asks for, each checked: ``guidance``, ``cfg_cutoff`` (null removes it),
    ``guidance_interval`` (``[start, end]``, null removes it), ``control_scale``, ``ip_adapter_scale``,
    ``cache_interval`` (an integer in [1, 50]), ``cache_threshold`` (a number in [0, 1])."""
    if not isinstance(body, dict):
        raise FieldError("body", body, "a JSON object")
    _unknown("", body, set(STEER_FIELDS))
    if not body:
        raise FieldError("body", body, f"an object with at least one of {', '.join(STEER_FIELDS)}")
    if "cfg_cutoff" in body and "guidance_interval" in body and None not in (body["cfg_cutoff"],
                                                                             body["guidance_interval"]):
        raise FieldError("guidance_interval", body["guidance_interval"], "left out when cfg_cutoff is given")
    changes: dict[str, Any] = {}
    if "guidance" in body:
        if body["guidance"] is None:
            raise FieldError("guidance", None, f"a number in [0, {MAX_GUIDANCE:g}]")
        changes["guidance"] = check_number(body["guidance"], "guidance", 0.0, MAX_GUIDANCE)
    if "cfg_cutoff" in body:
        changes["cfg_cutoff"] = None if body["cfg_cutoff"] is None else check_number(body["cfg_cutoff"], "cfg_cutoff", 0.0, 1.0)
    if "guidance_interval" in body:
        interval = body["guidance_interval"]
        changes["guidance_interval"] = None if interval is None else parse_interval(interval, "guidance_interval")
    if "control_scale" in body:
        changes["control_scale"] = check_control_scale(body["control_scale"])
    if "ip_adapter_scale" in body:
        changes["ip_adapter_scale"] = check_ip_adapter_scale(body["ip_adapter_scale"])
    if "cache_interval" in body:
        changes["cache_interval"] = _int("cache_interval", body["cache_interval"], 1, MAX_CACHE_INTERVAL)
    if "cache_threshold" in body:
        changes["cache_threshold"] = check_number(body["cache_threshold"], "cache_threshold", 0.0, 1.0)
    return changes
