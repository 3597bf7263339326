"""Compute policies: step caching and adaptive guidance, used from the callback list.

```py
pipe(prompt, callback_on_step_end=[SDXLCFGCutoffCallback(cutoff_step_ratio=0.4),
                                   DeepCacheCallback(cache_interval=3, cache_branch_id=0)])
```

A policy is a callback object. At run start it attaches per-run state to the run (``run.compute``); the
state decides, inside each model call, which of the denoiser's blocks run and which return what they
returned on an earlier step. The decision is made through the blocks' own ``forward``: while a run uses a
policy, the blocks it needs are wrapped (reference-counted, restored when the last such run ends), and
the wrapper asks a context variable which run's model call is executing, so a run in another thread, or
a call with no policy, runs the plain block. The denoiser's own ``forward`` is never copied.

Caches are kept per conditioning side (``cond`` / ``uncond``) with one row per image, so a CFG cutoff,
an interval or a schedule that changes the rows between steps reuses the right rows, and every image of
a batch gets exactly what it would get alone (decisions that depend on the pictures are made per row).
"""

from __future__ import annotations

import contextlib
import numbers
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch

__all__ = [
    "AdaptiveGuidanceCallback",
    "ComputePolicy",
    "DeepCacheCallback",
    "FirstBlockCacheCallback",
    "RunCompute",
    "TGateCallback",
]

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


def _rel_change(new: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row: mean |new - ref| / mean |ref| (First-Block-Cache's relative L1 change)."""
    dims = tuple(range(1, new.ndim))
    return (new - ref).abs().float().mean(dims) / ref.abs().float().mean(dims).clamp_min(1e-8)


# ------------------------------------------------------------------ the run's side


class _Call:
    """One model call of a run: its step, its conditioning sides and what the policies decided for it."""

    def __init__(self, compute: RunCompute, step: int, sides: tuple[str, ...], rows: int) -> None:
        self.compute, self.step, self.sides, self.rows = compute, step, sides, rows
        self.plans: dict[int, Any] = {}  # id(policy state) -> its plan for this call


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
        for other in self.states:
            if set(other.claims) & set(state.claims):
                raise ValueError(
                    f"{state.name} and {other.name} both cache the denoiser's {sorted(set(other.claims) & set(state.claims))};"
                    " use one of them"
                )
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

    name = "policy"
    claims: tuple[str, ...] = ()  # what part of the denoiser it caches (two policies may not claim the same)

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

    def make_state(self, pipeline: Any, run: Any) -> _PolicyState:
        raise NotImplementedError

    def on_run_start(self, pipeline: Any) -> None:
        run = getattr(pipeline, "current_run", None)
        if run is None:
            raise ValueError(f"{type(self).__name__} needs a stepdiff pipeline run (pass it in callback_on_step_end)")
        run.compute.add(self.make_state(pipeline, run))

    def __call__(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> None:
        return None


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


# ------------------------------------------------------------------ DeepCache


def _layers(block: torch.nn.Module) -> int:
    """The layers of a UNet block that DeepCache counts: resnets, attentions, up/down-samplers."""
    samplers = getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None) or []
    return len(block.resnets) + len(getattr(block, "attentions", None) or []) + len(samplers)


class _DeepCacheState(_PolicyState):
    """DeepCache (Ma et al. 2024): on all but every ``interval``-th step, the UNet's deep branch returns
    the features of the last full step; only the shallow branch (``cache_branch_id``) is computed.

    The same layers are skipped as by the ``deepcache`` package's ``DeepCacheSDHelper``: branch ``b`` is
    up/down block ``b // 3``, layer ``b % 3``, counted from the UNet's outer edge."""

    name = "DeepCacheCallback"
    claims = ("unet blocks",)

    def __init__(self, policy: DeepCacheCallback, pipeline: Any) -> None:
        self.interval = policy.cache_interval
        self.block_id, self.layer_id = divmod(policy.cache_branch_id, 3)
        self.reuse_controlnet = policy.controlnet == "reuse"
        self.unet = _unet(pipeline, self.name)
        if self.block_id >= len(self.unet.up_blocks):
            raise ValueError(
                f"cache_branch_id must be below {3 * len(self.unet.up_blocks)} for this UNet "
                f"({len(self.unet.up_blocks)} up blocks), got {policy.cache_branch_id}"
            )
        self.nets = list(pipeline.control_nets()) if hasattr(pipeline, "control_nets") else []
        self.cache: dict[Any, dict[str, Any]] = {}
        self.skip = False
        self.units: dict[Any, int] = {}  # a block's tag -> the layers it holds (what a skip of it saves)

    def modules(self) -> list[tuple[torch.nn.Module, Any]]:
        out: list[tuple[torch.nn.Module, Any]] = []
        unet = self.unet
        for i, block in enumerate(unet.down_blocks):
            for j, layer in enumerate(getattr(block, "attentions", None) or []):
                out.append((layer, ("down", "attn", i, j)))
            for j, layer in enumerate(block.resnets):
                out.append((layer, ("down", "resnet", i, j)))
            for layer in block.downsamplers or []:
                out.append((layer, ("down", "sampler", i, len(block.resnets))))
            out.append((block, ("down", "block", i, 0)))
            self.units[out[-1][1]] = _layers(block)
        out.append((unet.mid_block, ("mid", "block", 0, 0)))
        self.units[out[-1][1]] = 1
        n = len(unet.up_blocks)
        for i, block in enumerate(unet.up_blocks):
            bi, layers = n - i - 1, len(block.resnets)
            for j, layer in enumerate(getattr(block, "attentions", None) or []):
                out.append((layer, ("up", "attn", bi, layers - j - 1)))
            for j, layer in enumerate(block.resnets):
                out.append((layer, ("up", "resnet", bi, layers - j - 1)))
            for layer in block.upsamplers or []:
                out.append((layer, ("up", "sampler", bi, 0)))
            out.append((block, ("up", "block", bi, 0)))
            self.units[out[-1][1]] = _layers(block)
        if self.reuse_controlnet:
            out += [(net, ("controlnet", k)) for k, net in enumerate(self.nets)]
        return out

    def _skipped(self, tag: tuple) -> bool:
        where, _, block, layer = tag
        if where == "mid" or block > self.block_id:
            return True
        if block < self.block_id:
            return False
        return layer >= self.layer_id if where == "down" else layer > self.layer_id

    def begin(self, call: _Call) -> None:
        full = call.step % self.interval == 0
        self.skip = not full and bool(self.cache) and all(
            all(s in per_side for s in call.sides) for per_side in self.cache.values()
        )

    def _needed(self, tag: tuple) -> bool:
        """Whether a cached step returns this module's output (a layer inside a block that is skipped whole
        is never called then)."""
        return tag[0] in ("controlnet", "mid") or tag[1] == "block" or tag[2] == self.block_id

    def block(self, call: _Call, tag: Any, original: Callable, args: tuple, kwargs: dict) -> Any:
        units = self.units.get(tag, 1)
        own = 0 if tag in self.units and tag[0] != "mid" else 1  # a block's layers count themselves
        if tag[0] == "controlnet" or self._skipped(tag):
            if self.skip and tag in self.cache:
                self.count(call, 0, units)
                return _join(self.cache[tag], call.sides)
            out = original(*args, **kwargs)
            if not self.skip and self._needed(tag):  # a full step records what the cached steps will reuse
                self.cache[tag] = _split(out, call.sides)
            self.count(call, own)
            return out
        self.count(call, own)
        return original(*args, **kwargs)

    def finish_call(self, call: _Call) -> bool:
        return self.skip

    def free(self) -> None:
        self.cache.clear()


class DeepCacheCallback(ComputePolicy):
    """Reuse the UNet's deep features between steps (DeepCache, Ma et al. 2024): one step in
    ``cache_interval`` runs the whole UNet; the others compute only the shallow branch
    ``cache_branch_id`` (0: the outermost layers, fastest). Names and meaning as in the ``deepcache``
    package's ``set_params``. ``cache_interval=1`` is the uncached run, exactly.

    ``controlnet``: on cached steps, ``"reuse"`` the ControlNet residuals of the last full step
    (the ControlNet is skipped too; default) or ``"run"`` the ControlNet every step. For every UNet
    pipeline: SD 1.x/2.x and SDXL; text-to-image, img2img, inpainting, ControlNet, IP-Adapter.
    """

    def __init__(self, cache_interval: int = 3, cache_branch_id: int = 0, controlnet: str = "reuse") -> None:
        self.cache_interval = _check_int("cache_interval", cache_interval, 1)
        self.cache_branch_id = _check_int("cache_branch_id", cache_branch_id, 0)
        if controlnet not in ("reuse", "run"):
            raise ValueError(f"controlnet must be 'reuse' or 'run', got {controlnet!r}")
        self.controlnet = controlnet

    def make_state(self, pipeline: Any, run: Any) -> _PolicyState:
        return _DeepCacheState(self, pipeline)

    def __repr__(self) -> str:
        return (f"DeepCacheCallback(cache_interval={self.cache_interval}, cache_branch_id={self.cache_branch_id}, "
                f"controlnet={self.controlnet!r})")


# ------------------------------------------------------------------ T-GATE


class _TGateState(_PolicyState):
    """Per step, what each UNet attention does, as in the ``tgate`` package's scheduler: compute, compute and
    keep (``cache``), or return what was kept (``reuse``). At the step before the gate both attentions keep
    the mean of the guided pair; from the gate on, cross-attention is reused."""

    name = "TGateCallback"
    claims = ("attention",)

    def __init__(self, policy: TGateCallback, pipeline: Any) -> None:
        self.policy = policy
        unet = _unet(pipeline, self.name)
        self.attn = [(m, ("cross" if n.endswith("attn2") else "self", k))
                     for k, (n, m) in enumerate(unet.named_modules()) if n.endswith(("attn1", "attn2"))]
        self.cache: dict[Any, dict[str, torch.Tensor]] = {}
        self.reused = False

    def modules(self) -> list[tuple[torch.nn.Module, Any]]:
        return self.attn

    def _action(self, kind: str, step: int) -> str:
        p, gate = self.policy, self.policy.gate_step
        if step == gate - 1:
            return "cache-mean"
        if kind == "cross":
            return "reuse" if step > gate - 1 else "compute"
        if step > gate - 1:  # fidelity-improving phase
            return "cache" if step % p.fi_interval == 0 else "reuse"
        if step < p.warm_up:  # semantics-planning phase
            return "compute"
        return "cache" if step == p.warm_up or step % p.sp_interval == 0 else "reuse"

    def begin(self, call: _Call) -> None:
        self.reused = False

    def block(self, call: _Call, tag: Any, original: Callable, args: tuple, kwargs: dict) -> Any:
        action = self._action(tag[0], call.step)
        kept = self.cache.get(tag)
        if action == "reuse" and kept is not None and all(s in kept for s in call.sides):
            self.count(call, 0, 1)
            self.reused = True
            return _join(kept, call.sides)
        out = original(*args, **kwargs)
        if action == "cache":
            self.cache[tag] = _split(out, call.sides)
        elif action == "cache-mean":  # one value for both sides: the mean of the rows of each side
            parts = out.chunk(len(call.sides))
            mean = parts[0] if len(parts) == 1 else sum(parts) / len(parts)
            self.cache[tag] = {"cond": mean, "uncond": mean}
        self.count(call, 1)
        return out

    def finish_call(self, call: _Call) -> bool:
        return self.reused

    def free(self) -> None:
        self.cache.clear()


class TGateCallback(ComputePolicy):
    """T-GATE (Zhang et al. 2024): from step ``gate_step`` on, every UNet cross-attention returns its output
    of the step before the gate (the mean of the conditional and unconditional rows) and classifier-free
    guidance is off, so only the conditional rows run. Self-attention is kept and reused between steps as in
    the ``tgate`` package (recomputed every ``sp_interval`` steps after ``warm_up`` before the gate, every
    ``fi_interval`` steps after it); names and defaults are the package's.

    A ``gate_step`` past the run's last step with ``sp_interval=1`` changes nothing. UNet families
    (SD 1.x/2.x, SDXL): SD3's joint attention mixes text and image tokens in one attention, so there is no
    separate cross-attention to cache.
    """

    def __init__(self, gate_step: int = 10, sp_interval: int = 5, fi_interval: int = 1, warm_up: int = 2) -> None:
        self.gate_step = _check_int("gate_step", gate_step, 1)
        self.sp_interval = _check_int("sp_interval", sp_interval, 1)
        self.fi_interval = _check_int("fi_interval", fi_interval, 1)
        self.warm_up = _check_int("warm_up", warm_up, 0)

    def make_state(self, pipeline: Any, run: Any) -> _PolicyState:
        return _TGateState(self, pipeline)

    def __call__(self, pipeline: Any, step_index: int, timestep: torch.Tensor, callback_kwargs: dict) -> None:
        if step_index == self.gate_step - 1:
            pipeline.guidance_scale = 0.0
        return None

    def __repr__(self) -> str:
        return (f"TGateCallback(gate_step={self.gate_step}, sp_interval={self.sp_interval}, "
                f"fi_interval={self.fi_interval}, warm_up={self.warm_up})")


# ------------------------------------------------------------------ First-Block-Cache


class _FirstBlockState(_PolicyState):
    """Per row: when the first block's output changed by less than ``threshold`` (relative L1) since the
    row's last full computation, the rest of the denoiser is not run for that row.

    UNet: the first down block decides; the deeper blocks return their last full outputs and the last up
    block (the full-resolution one) is computed on fresh skip connections. Transformers (SD3): the first
    block decides; the later blocks are skipped and their residual from the last full step is added."""

    name = "FirstBlockCacheCallback"
    claims = ("unet blocks", "transformer blocks")

    def __init__(self, policy: FirstBlockCacheCallback, pipeline: Any) -> None:
        self.threshold = policy.threshold
        denoiser = pipeline.denoiser
        if hasattr(denoiser, "down_blocks"):
            self.kind = "unet"
            self.tagged = [(denoiser.down_blocks[0], "first")]
            rest = [*denoiser.down_blocks[1:], denoiser.mid_block, *denoiser.up_blocks[:-1]]
            self.tagged += [(m, ("rest", k)) for k, m in enumerate(rest)]
        elif hasattr(denoiser, "transformer_blocks") and len(denoiser.transformer_blocks) > 1:
            self.kind = "transformer"
            blocks = denoiser.transformer_blocks
            self.tagged = [(blocks[0], "first")]
            self.tagged += [(m, ("rest", k)) for k, m in enumerate(blocks[1:-1])]
            self.tagged.append((blocks[-1], "last"))
        else:
            raise ValueError(f"FirstBlockCacheCallback needs a UNet or a transformer with 2 or more blocks, "
                             f"got {type(denoiser).__name__}")
        self.ref: dict[str, torch.Tensor] = {}  # per side: the first block's output at the row's last full step
        self.cache: dict[Any, dict[str, Any]] = {}
        self.skip_rows: torch.Tensor | None = None
        self.first_out: Any = None

    def modules(self) -> list[tuple[torch.nn.Module, Any]]:
        return self.tagged

    def begin(self, call: _Call) -> None:
        self.skip_rows = None
        self.first_out = None

    def _hidden(self, out: Any) -> torch.Tensor:
        """The image features of the first block's output: a UNet down block gives (sample, skips), a joint
        transformer block (context, hidden)."""
        return out[0] if self.kind == "unet" else out[1]

    def _decide(self, call: _Call, hidden: torch.Tensor) -> None:
        per_side = _split(hidden, call.sides)
        masks = []
        for side in call.sides:
            ref = self.ref.get(side)
            if ref is None or ref.shape != per_side[side].shape:
                masks.append(torch.zeros(per_side[side].shape[0], dtype=torch.bool, device=hidden.device))
            else:
                masks.append(_rel_change(per_side[side], ref) < self.threshold)
        skip = torch.cat(masks)
        self.skip_rows = skip if bool(skip.any()) else None
        for side, part in zip(call.sides, skip.chunk(len(call.sides))):  # refresh the rows computed in full
            keep = ~part
            if bool(keep.all()) or side not in self.ref:
                self.ref[side] = per_side[side]
            elif bool(keep.any()):
                self.ref[side] = torch.where(keep.view(-1, *[1] * (hidden.ndim - 1)), per_side[side], self.ref[side])

    def _record(self, call: _Call, tag: Any, out: Any, rows: torch.Tensor | None) -> None:
        """Keep the rows computed in full (all, or ``rows``) of a block's output, per side."""
        per_side = _split(out, call.sides)
        if rows is None:
            self.cache[tag] = {**self.cache.get(tag, {}), **per_side}
            return
        stored = self.cache.setdefault(tag, {})
        for side, part in zip(call.sides, rows.chunk(len(call.sides))):
            if side not in stored:
                stored[side] = per_side[side]  # only reached for a side whose rows all computed
            elif bool(part.any()):
                stored[side] = _zip_map(lambda new, old, p=part: torch.where(
                    p.view(-1, *[1] * (new.ndim - 1)), new, old), per_side[side], stored[side])

    def block(self, call: _Call, tag: Any, original: Callable, args: tuple, kwargs: dict) -> Any:
        if tag == "first":
            out = original(*args, **kwargs)
            self.first_out = out
            self._decide(call, self._hidden(out))
            self.count(call, 1)
            return out
        skip = self.skip_rows
        if self.kind == "unet":
            return self._unet_rest(call, tag, original, args, kwargs, skip)
        return self._transformer_rest(call, tag, original, args, kwargs, skip)

    def _unet_rest(self, call, tag, original, args, kwargs, skip):
        if skip is None:
            out = original(*args, **kwargs)
            self._record(call, tag, out, None)
            self.count(call, 1)
            return out
        cached = _join(self.cache[tag], call.sides)
        if bool(skip.all()):
            self.count(call, 0, 1)
            return cached
        compute = ~skip
        out = original(*_select(args, compute, call.rows), **_select(kwargs, compute, call.rows))
        full = _blend(compute, out, cached)
        self._record(call, tag, full, compute)
        self.count(call, 1)
        return full

    def _transformer_rest(self, call, tag, original, args, kwargs, skip):
        hidden, context = kwargs["hidden_states"], kwargs.get("encoder_hidden_states")
        if skip is not None and bool(skip.all()):
            self.count(call, 0, 1)
            return self._skipped_output(call, tag, context, hidden)
        if skip is None:
            out = original(*args, **kwargs)
        else:
            compute = ~skip
            part = original(*_select(args, compute, call.rows), **_select(kwargs, compute, call.rows))
            out = _blend(compute, part, self._skipped_output(call, tag, context, hidden))
        if tag == "last":  # the residual of the later blocks, per side, for the rows computed in full
            first_e, first_h = self.first_out
            residual = (None if out[0] is None else out[0] - first_e, out[1] - first_h)
            self._record(call, "residual", residual, None if skip is None else ~skip)
        self.count(call, 1)
        return out

    def _skipped_output(self, call, tag, context, hidden):
        if tag != "last":
            return (context, hidden)  # the later blocks' work comes back as one residual at the last block
        first_e, first_h = self.first_out
        res_e, res_h = _join(self.cache["residual"], call.sides)
        return (None if res_e is None else first_e + res_e, first_h + res_h)

    def finish_call(self, call: _Call) -> bool:
        return self.skip_rows is not None

    def free(self) -> None:
        self.cache.clear()
        self.ref.clear()
        self.first_out = None


class FirstBlockCacheCallback(ComputePolicy):
    """Adaptive reuse (First-Block-Cache, as in ParaAttention and the classic library's hooks): each step
    runs the denoiser's first block; an image whose first-block output changed by less than
    ``threshold`` (relative L1) since its last full step skips the rest. For SD 1.x/2.x and SDXL UNets
    and SD3's transformer. ``threshold=0`` is the uncached run, exactly. Decisions are per image, so a
    batch gives each image what it gets alone."""

    def __init__(self, threshold: float = 0.08) -> None:
        self.threshold = _check_real("threshold", threshold, 0.0, 1.0)

    def make_state(self, pipeline: Any, run: Any) -> _PolicyState:
        return _FirstBlockState(self, pipeline)

    def __repr__(self) -> str:
        return f"FirstBlockCacheCallback(threshold={self.threshold:g})"


# ------------------------------------------------------------------ adaptive guidance


class AdaptiveGuidanceCallback(ComputePolicy):
    """Adaptive guidance (Castillo et al. 2023): classifier-free guidance ends for an image from the step
    after the cosine similarity of its conditional and unconditional predictions passes ``threshold``.
    Per image; the unconditional rows stop being computed once every image of the batch is past it.
    ``threshold=1`` never ends guidance (the uncached run, exactly)."""

    def __init__(self, threshold: float = 0.99) -> None:
        self.threshold = _check_real("threshold", threshold, 0.0, 1.0)

    def on_run_start(self, pipeline: Any) -> None:
        run = getattr(pipeline, "current_run", None)
        guidance = getattr(run, "guidance", None)
        if not hasattr(guidance, "end_when_similar"):
            raise ValueError(
                f"AdaptiveGuidanceCallback needs classifier-free guidance; this run's guidance is "
                f"{getattr(guidance, 'mode', None)!r}"
            )
        guidance.end_when_similar(self.threshold)

    def __repr__(self) -> str:
        return f"AdaptiveGuidanceCallback(threshold={self.threshold:g})"
