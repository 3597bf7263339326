"""The machinery of compute policies: block wrappers, per-side caches, a run's policy states and counts."""

from __future__ import annotations

import contextlib
import numbers
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch

__all__ = ["ComputePolicy", "RunCompute", "check_policies"]

_CALL: ContextVar[_Call | None] = ContextVar("stepdiff_model_call", default=None)
_LOCK = threading.Lock()
_WRAPPED: dict[int, tuple[torch.nn.Module, int]] = {}  # id(module) -> (module, number of runs using it)


# ------------------------------------------------------------------ block wrappers


def _acquire(modules: list[torch.nn.Module]) -> None:
    with _LOCK:
        for m in modules:
            entry = _WRAPPED.get(id(m))
            if entry is None:
                m.forward = _wrapped_forward(m, m.forward)  # an instance attribute: the class's forward is untouched
                entry = (m, 0)
            _WRAPPED[id(m)] = (m, entry[1] + 1)


def _release(modules: list[torch.nn.Module]) -> None:
    with _LOCK:
        for m in modules:
            module, count = _WRAPPED[id(m)]
            if count > 1:
                _WRAPPED[id(m)] = (module, count - 1)
            else:
                del _WRAPPED[id(m)]
                m.__dict__.pop("forward", None)


def _wrapped_forward(module: torch.nn.Module, original: Callable) -> Callable:
    def forward(*args: Any, **kwargs: Any) -> Any:
        call = _CALL.get()
        owner = None if call is None else call.compute.owners.get(id(module))
        if owner is None:
            return original(*args, **kwargs)
        return owner[0].block(call, owner[1], original, args, kwargs)

    return forward


# ------------------------------------------------------------------ rows and sides


def _map(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``fn`` on every tensor of a (nested tuple/list) block output; other leaves unchanged."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return value


def _zip_map(fn: Callable[..., torch.Tensor], first: Any, *others: Any) -> Any:
    if isinstance(first, torch.Tensor):
        return fn(first, *others)
    if isinstance(first, (tuple, list)):
        return type(first)(_zip_map(fn, *parts) for parts in zip(first, *others))
    return first


def _split(value: Any, sides: tuple[str, ...]) -> dict[str, Any]:
    """A block output of a call with ``sides`` (rows in side order) as one value per side."""
    n = len(sides)
    return {s: _map(value, lambda t, k=k: t.chunk(n)[k]) for k, s in enumerate(sides)}


def _join(per_side: dict[str, Any], sides: tuple[str, ...]) -> Any:
    parts = [per_side[s] for s in sides]
    return parts[0] if len(parts) == 1 else _zip_map(lambda *ts: torch.cat(ts), *parts)


def _select(value: Any, rows: torch.Tensor, n: int) -> Any:
    """The rows in ``rows`` (a bool mask) of every tensor with ``n`` rows."""
    return _map(value, lambda t: t[rows] if t.ndim and t.shape[0] == n else t)


def _blend(rows: torch.Tensor, computed: Any, cached: Any) -> Any:
    """``computed`` (the rows where ``rows`` is True, in order) spread over ``cached``."""

    def put(c: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        out = old.clone()
        out[rows] = c
        return out

    return _zip_map(put, computed, cached)


def _rows(args: tuple, kwargs: dict) -> int | None:
    """The rows of a module call: those of its first tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return None


def _rel_change(new: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row: mean |new - ref| / mean |ref| (First-Block-Cache's relative L1 change)."""
    dims = tuple(range(1, new.ndim))
    return (new - ref).abs().float().mean(dims) / ref.abs().float().mean(dims).clamp_min(1e-8)


# ------------------------------------------------------------------ the run's side


class _Call:
    """One model call of a run: its step, its conditioning sides and what the policies decided for it."""

    def __init__(self, compute: RunCompute, step: int, sides: tuple[str, ...], rows: int) -> None:
        self.compute, self.step, self.sides, self.rows = compute, step, sides, rows


class RunCompute:
    """The compute policies of one run, their caches and their counts (``run.compute``)."""

    def __init__(self) -> None:
        self.states: list[_PolicyState] = []
        self.owners: dict[int, tuple[_PolicyState, Any]] = {}  # id(module) -> (policy state, its tag)
        self.modules: list[torch.nn.Module] = []
        self.cached_calls = 0
        self.blocks_computed = 0
        self.blocks_skipped = 0

    def add(self, state: _PolicyState) -> None:
        check_policies([*(other.policy for other in self.states), state.policy], "callback_on_step_end")
        tagged = state.modules()
        for module, tag in tagged:
            self.owners[id(module)] = (state, tag)
        new = [m for m, _ in tagged]
        _acquire(new)
        self.modules += new
        self.states.append(state)

    @contextlib.contextmanager
    def call(self, step: int, sides: tuple[str, ...], rows: int) -> Iterator[None]:
        if not self.modules or not sides:  # nothing wrapped, or an extra pass (skip-layer guidance): plain call
            yield
            return
        call = _Call(self, step, sides, rows)
        for state in self.states:
            state.begin(call)
        token = _CALL.set(call)
        try:
            yield
        finally:
            _CALL.reset(token)
        if any(state.finish_call(call) for state in self.states):
            self.cached_calls += 1

    def free(self) -> None:
        """Drop every cache and unwrap the blocks (once the last run using them ends)."""
        modules, self.modules = self.modules, []
        if modules:
            _release(modules)
        self.owners.clear()
        for state in self.states:
            state.free()


class _PolicyState:
    """A policy's state for one run."""

    policy: ComputePolicy  # the callback whose state this is

    def modules(self) -> list[tuple[torch.nn.Module, Any]]:
        return []

    def begin(self, call: _Call) -> None:
        """Decide what can be decided before the model call."""

    def block(self, call: _Call, tag: Any, original: Callable, args: tuple, kwargs: dict) -> Any:
        return original(*args, **kwargs)

    def finish_call(self, call: _Call) -> bool:
        """Whether this call reused anything."""
        return False

    def free(self) -> None:
        pass

    def count(self, call: _Call, computed: int, skipped: int = 0) -> None:
        call.compute.blocks_computed += computed
        call.compute.blocks_skipped += skipped


class ComputePolicy:
    """A callback that attaches a compute policy to each run that lists it (no change to the step's tensors)."""

    tensor_inputs: list[str] = []  # noqa: RUF012 - class-level declaration, as in the callback API
    claims: tuple[str, ...] = ()  # the parts of the denoiser it caches: two policies of a run may not share one
    needs_unet = False  # whether it caches a UNet's blocks (SD 1.x/2.x, SDXL) and so refuses transformer families

    def make_state(self, pipeline: Any, run: Any) -> _PolicyState:
        raise NotImplementedError

    def on_run_start(self, pipeline: Any) -> None:
        run = getattr(pipeline, "current_run", None)
        if run is None:
            raise ValueError(f"{type(self).__name__} needs a stepdiff pipeline run (pass it in callback_on_step_end)")
        run.compute.add(self.make_state(pipeline, run))

    def __call__(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> None:
        return None


def check_policies(policies: list[Any], name: str, unet: bool | None = None) -> None:
    """Refuse policies that cannot run together, naming ``name`` (the argument, flag or field that gave them): a
    policy given twice, two policies caching the same part of the denoiser, and, when ``unet`` is known,
    UNet policies (DeepCache, T-GATE) on a model without a UNet."""
    kinds = [type(p).__name__ for p in policies]
    for kind in kinds:
        if kinds.count(kind) > 1:
            raise ValueError(f"{name}: {kind} is given twice; give each policy once")
    for k, a in enumerate(policies):
        for b in policies[k + 1:]:
            shared = sorted(set(getattr(a, "claims", ())) & set(getattr(b, "claims", ())))
            if shared:
                raise ValueError(f"{name}: {type(a).__name__} and {type(b).__name__} both cache the denoiser's "
                                 f"{' and '.join(shared)}; use one of them")
    unet_only = [type(p).__name__ for p in policies if getattr(p, "needs_unet", False)]
    if unet_only and unet is False:
        verb = "caches" if len(unet_only) == 1 else "cache"
        raise ValueError(f"{name}: {' and '.join(unet_only)} {verb} a UNet's blocks and this model has none (SD3 and "
                         "other transformer models): use fbc:THRESHOLD or adaptive:THRESHOLD")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_real(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= float(value) <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _unet(pipeline: Any, policy: str) -> Any:
    unet = getattr(pipeline, "unet", None)
    if unet is None or not hasattr(unet, "up_blocks"):
        raise ValueError(
            f"{policy} caches a UNet's blocks; {type(pipeline).__name__} has no UNet "
            "(SD3 and other transformer families: use FirstBlockCacheCallback)"
        )
    return unet
