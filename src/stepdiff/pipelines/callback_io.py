"""Step callbacks on the pipeline side: which callables and tensors a call asked for, the tensors handed to a
callback, what it returns applied to the step, and the callbacks' optional run hooks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..callbacks import MultiPipelineCallbacks, adapt_classic
from ..loop import LoopState

__all__ = ["apply_callback_result", "resolve_callback", "run_hooks", "run_step_callback", "state_tensor"]


def run_hooks(callback: object, hook: str, pipeline: Any) -> None:
    """Optional ``on_run_start(pipeline)`` / ``on_run_end(pipeline)`` methods of callbacks (and of a list's members)."""
    members = callback.callbacks if isinstance(callback, MultiPipelineCallbacks) else [callback]
    for member in members:
        fn = getattr(member, hook, None)
        if callable(fn):
            fn(pipeline)


def resolve_callback(
    pipe: Any, callback: object, tensor_inputs: Sequence[str] | None
) -> tuple[Callable | None, list[str]]:
    requested = ["latents"] if tensor_inputs is None else tensor_inputs
    if isinstance(requested, str) or not all(isinstance(n, str) for n in requested):
        raise TypeError(f"callback_on_step_end_tensor_inputs must be a list of names, got {requested!r}")
    names = list(dict.fromkeys(requested))
    if callback is None:
        fn = None
    elif isinstance(callback, (list, tuple)):
        fn = MultiPipelineCallbacks([adapt_classic(cb) for cb in callback])
        for name in fn.tensor_inputs:
            if name not in names:
                names.append(name)
    elif hasattr(callback, "tensor_inputs") and callable(callback):
        fn = adapt_classic(callback)
        names = list(dict.fromkeys(fn.tensor_inputs))  # an official callback declares its own inputs
    elif callable(callback):
        fn = callback
    else:
        raise TypeError(
            "callback_on_step_end must be a callable (pipeline, step_index, timestep, callback_kwargs) -> dict, "
            f"a PipelineCallback, or a list of them; got {callback!r} ({type(callback).__name__})"
        )
    unknown = [n for n in names if n not in pipe._callback_tensor_inputs]
    if unknown:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs has {unknown}, which {type(pipe).__name__} does not provide; "
            f"allowed: {pipe._callback_tensor_inputs}"
        )
    return fn, names


def state_tensor(pipe: Any, state: LoopState, name: str) -> torch.Tensor:
    if name == "latents":
        return state.latents
    if name == "denoised":
        return state.denoised
    side, key = pipe._callback_names[name]
    return (state.cond if side == "cond" else state.uncond)[key]

def apply_callback_result(pipe: Any, state: LoopState, result: object, step: int) -> None:
    if result is None:  # "no change"; the classic library crashes here
        return
    if not isinstance(result, dict):
        raise TypeError(
            f"callback_on_step_end must return a dict (or None) but returned {type(result).__name__} at step {step}"
        )
    for name, value in result.items():
        if name not in pipe._callback_tensor_inputs:
            raise ValueError(
                f"callback_on_step_end returned unknown key {name!r} at step {step}; "
                f"allowed: {pipe._callback_tensor_inputs}"
            )
        current = pipe._state_tensor(state, name)
        if value is current:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"callback_on_step_end returned {name!r} as {type(value).__name__} at step {step}; expected a tensor"
            )
        if value.shape != current.shape:
            raise ValueError(
                f"callback_on_step_end returned {name!r} with shape {tuple(value.shape)} at step {step}; "
                f"expected {tuple(current.shape)}"
            )
        if value.dtype != current.dtype or value.device != current.device:
            raise ValueError(
                f"callback_on_step_end returned {name!r} as {value.dtype} on {value.device} at step {step}; "
                f"expected {current.dtype} on {current.device}"
            )
        if name == "denoised":  # derived each step: checked, but nothing to write back
            continue
        if name == "latents":
            state.latents = value
        else:
            side, key = pipe._callback_names[name]
            (state.cond if side == "cond" else state.uncond)[key] = value

def run_step_callback(pipe: Any, run: Any, fn: Callable, state: LoopState, names: list[str]) -> None:
    """Call a step callback with the tensors it asked for (``names``) and apply what it returns to the step; an
    error it raises is told where (step and timestep). Called by the run after each step."""
    step, t = state.step_index, state.timestep
    kwargs = {name: pipe._state_tensor(state, name) for name in names}
    try:
        result = fn(pipe, step, t, kwargs)
    except Exception as e:
        where = f"(raised in callback_on_step_end at step {step}, timestep {float(t):g})"
        if len(e.args) == 1 and isinstance(e.args[0], str):
            e.args = (f"{e.args[0]} {where}",)
        elif hasattr(e, "add_note"):
            e.add_note(where)
        raise
    pipe._apply_callback_result(state, result, step)
