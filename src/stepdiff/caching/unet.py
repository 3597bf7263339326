"""UNet compute policies: DeepCache and T-GATE."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .core import ComputePolicy, _Call, _check_int, _join, _PolicyState, _rows, _split, _unet

__all__ = ["DeepCacheCallback", "TGateCallback"]


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

    def __init__(self, policy: DeepCacheCallback, pipeline: Any) -> None:
        self.policy = policy
        self.interval = policy.cache_interval
        self.block_id, self.layer_id = divmod(policy.cache_branch_id, 3)
        self.reuse_controlnet = policy.controlnet == "reuse"
        self.unet = _unet(pipeline, type(policy).__name__)
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
        if tag[0] == "controlnet" and _rows(args, kwargs) != call.rows:  # guess mode: a ControlNet on some rows
            self.count(call, own)
            return original(*args, **kwargs)
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

    claims = ("UNet blocks",)
    needs_unet = True

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

    def __init__(self, policy: TGateCallback, pipeline: Any) -> None:
        self.policy = policy
        unet = _unet(pipeline, type(policy).__name__)
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

    claims = ("attention layers",)
    needs_unet = True

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
