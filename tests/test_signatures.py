"""Every registered pipeline class has the classic class's ``__call__`` signature: the same names in the same
order with the same defaults (a positional caller of the classic class gets the same binding), plus stepdiff's
own keyword arguments at the end. One registry-wide test, so a new class or an edit of the table the signatures
are generated from (``stepdiff.pipelines.signatures``; tests/test_signature_table.py) cannot drift."""

import inspect

import diffusers
import pytest

import stepdiff
from stepdiff.pipelines.registry import REGISTRY

OURS_ONLY = ["cancel", "interrupt_output"]  # stepdiff's own, after every classic argument
# Classic arguments stepdiff's classes leave out, each with why (docs/what-differs.md says so to users).
LEFT_OUT = {"kwargs": "the classic **kwargs only takes the removed `callback` / `callback_steps` arguments"}
LEFT_OUT_BY_FAMILY = {"sd3": {"ip_adapter_image": "IP-Adapters on SD3 are not supported yet",
                              "ip_adapter_image_embeds": "IP-Adapters on SD3 are not supported yet"}}
# The classic default is a mutable list; stepdiff's None means the same (the latents only).
SAME_DEFAULTS = {"callback_on_step_end_tensor_inputs": (None, ["latents"])}


def _params(cls):
    return inspect.signature(cls.__call__).parameters


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.name for e in REGISTRY])
def test_call_signature_is_the_classic_one(entry):
    ours, theirs = _params(getattr(stepdiff, entry.name)), _params(getattr(diffusers, entry.name))
    left_out = {**LEFT_OUT, **LEFT_OUT_BY_FAMILY.get(entry.family, {})}
    classic = [n for n in theirs if n not in left_out]
    names = list(ours)
    assert names[-len(OURS_ONLY):] == OURS_ONLY, f"{entry.name}: stepdiff's own arguments come last"
    assert names[: -len(OURS_ONLY)] == classic, f"{entry.name}: names or order differ from the classic class"
    for name in classic:
        a, b = ours[name].default, theirs[name].default
        if name in SAME_DEFAULTS:
            assert (a, b) == SAME_DEFAULTS[name], name
        else:
            assert a == b or (a is None and b is inspect.Parameter.empty), f"{entry.name}.{name}: {a!r} != {b!r}"
        assert ours[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def test_the_check_can_fail():
    """A class with an argument moved, as SDXL's denoising_end once was, fails the check."""

    class Moved(stepdiff.StableDiffusionXLPipeline):
        def __call__(self, prompt=None, prompt_2=None, height=None, width=None, num_inference_steps=50,
                     timesteps=None, sigmas=None, guidance_scale=5.0, denoising_end=None, **kw):
            return None

    names = [n for n in _params(Moved) if n != "kw"]
    classic = list(_params(diffusers.StableDiffusionXLPipeline))[: len(names)]
    assert names != classic
