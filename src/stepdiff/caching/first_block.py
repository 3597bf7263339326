"""Adaptive policies: First-Block-Cache (UNet and transformer) and adaptive guidance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .core import ComputePolicy, _blend, _Call, _check_real, _join, _PolicyState, _rel_change, _select, _split, _zip_map

__all__ = ["AdaptiveGuidanceCallback", "FirstBlockCacheCallback"]


# ------------------------------------------------------------------ First-Block-Cache


def _keep_rows(stored: dict[str, Any], per_side: dict[str, Any], sides: tuple[str, ...],
               rows: torch.Tensor | None) -> None:
    """Update ``stored`` (a value per side) with the rows of ``per_side`` marked in ``rows`` (all rows when None)."""
    if rows is None:
        stored.update(per_side)
        return
    for side, part in zip(sides, rows.chunk(len(sides))):
        if side not in stored:
            stored[side] = per_side[side]  # only reached for a side whose rows all computed
        elif bool(part.any()):
            stored[side] = _zip_map(lambda new, old, p=part: torch.where(
                p.view(-1, *[1] * (new.ndim - 1)), new, old), per_side[side], stored[side])


def _blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """A transformer's blocks in call order: SD3's joint blocks; Flux's joint (double-stream) blocks, then its single-stream
    ones (both take and return (context, hidden) separately, so one residual spans them)."""
    return [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]


class _FirstBlockState(_PolicyState):
    """Per row: when the first block's output changed by less than ``threshold`` (relative L1) since the
    row's last full computation, the rest of the denoiser is not run for that row.

    UNet: the first down block decides; the deeper blocks return their last full outputs and the last up
    block (the full-resolution one) is computed on fresh skip connections. Transformers (SD3, Flux): the first
    block decides; the later blocks are skipped and their residual from the last full step is added."""

    def __init__(self, policy: FirstBlockCacheCallback, pipeline: Any) -> None:
        self.policy = policy
        self.threshold = policy.threshold
        denoiser = pipeline.denoiser
        if hasattr(denoiser, "down_blocks"):
            self.kind = "unet"
            self.tagged = [(denoiser.down_blocks[0], "first")]
            rest = [*denoiser.down_blocks[1:], denoiser.mid_block, *denoiser.up_blocks[:-1]]
            self.tagged += [(m, ("rest", k)) for k, m in enumerate(rest)]
        elif hasattr(denoiser, "transformer_blocks") and len(_blocks(denoiser)) > 1:
            self.kind = "transformer"
            blocks = _blocks(denoiser)
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
        _keep_rows(self.ref, per_side, call.sides, ~skip)  # the reference follows the rows computed in full

    def _record(self, call: _Call, tag: Any, out: Any, rows: torch.Tensor | None) -> None:
        """Keep the rows computed in full (all, or ``rows``) of a block's output, per side."""
        _keep_rows(self.cache.setdefault(tag, {}), _split(out, call.sides), call.sides, rows)

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
    and SD3's and Flux's transformers. ``threshold=0`` is the uncached run, exactly. Decisions are per image, so a
    batch gives each image what it gets alone."""

    # the attention layers too: an image that is computed while another skips runs the blocks on a subset of the
    # rows, which an attention-level cache (T-GATE) keyed by the whole call cannot follow
    claims = ("UNet blocks", "transformer blocks", "attention layers")

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

    def __init__(self, threshold: float = 0.999) -> None:
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
