"""Fuzz what callbacks return: the pipeline either runs or raises a clear error, and the same pipeline
object keeps giving the reference result afterwards (nothing leaks from a failed call into the next)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import gen

NAMES = ["latents", "prompt_embeds", "negative_prompt_embeds", "denoised"]
MODES = ["same", "zeros", "wrong_shape", "wrong_dtype", "numpy", "int", "string", "none", "nan"]
RETURNS = st.one_of(
    st.just(("none", [])),
    st.sampled_from(["list", "string", "int", "tuple"]).map(lambda kind: (kind, [])),
    st.lists(st.tuples(st.sampled_from([*NAMES, "noise", "latent"]), st.sampled_from(MODES)), max_size=4).map(
        lambda plan: ("dict", plan)
    ),
)


def _value(mode, tensor):
    return {
        "same": lambda: tensor,
        "zeros": lambda: torch.zeros_like(tensor),
        "wrong_shape": lambda: tensor[..., :1],
        "wrong_dtype": lambda: tensor.double(),
        "numpy": lambda: tensor.numpy(),
        "int": lambda: 3,
        "string": lambda: "latents",
        "none": lambda: None,
        "nan": lambda: torch.full_like(tensor, float("nan")),
    }[mode]()


@pytest.fixture(scope="module")
def fuzz_pipe(sd_folder):
    import stepdiff

    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=RETURNS, step=st.integers(0, 2))
def test_callback_return_values(fuzz_pipe, spec, step):
    kind, plan = spec
    reference = fuzz_pipe("a cat", num_inference_steps=3, generator=gen(), output_type="latent").images

    def callback(p, i, t, kw):
        if i != step:
            return kw
        if kind == "dict":
            return {key: _value(mode, kw.get(key, kw["latents"])) for key, mode in plan}
        return {"none": None, "list": [kw], "string": "latents", "int": 1, "tuple": (kw,)}[kind]

    try:
        out = fuzz_pipe("a cat", num_inference_steps=3, generator=gen(), output_type="latent",
                        callback_on_step_end=callback, callback_on_step_end_tensor_inputs=NAMES)
        assert out.steps_completed == 3
    except (TypeError, ValueError) as e:
        message = str(e)
        assert "callback_on_step_end" in message and f"step {step}" in message, message
    except FloatingPointError as e:  # NaN handed back: the run stops at the next step, before decoding
        assert f"NaN or inf at step {step + 1}" in str(e), str(e)
    again = fuzz_pipe("a cat", num_inference_steps=3, generator=gen(), output_type="latent").images
    assert torch.equal(again, reference)
