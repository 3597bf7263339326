"""Model calls run under torch.inference_mode; nothing the user sees is an inference tensor."""

import pytest
import torch

from .conftest import gen


def _mode_per_call(pipe):
    modes = []
    handle = pipe.denoiser.register_forward_pre_hook(lambda m, a: modes.append(torch.is_inference_mode_enabled()))
    return modes, handle


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_everything_handed_out_is_an_ordinary_tensor(pipe, guidance):
    seen = []

    def edit(p, i, t, kw):
        for name, value in kw.items():
            seen.append((name, value.is_inference()))
            value.mul_(1.0)  # in place, outside inference mode: raises on an inference tensor
        return kw

    out = pipe("a cat", num_inference_steps=3, guidance_scale=guidance, generator=gen(0), output_type="pt",
               callback_on_step_end=edit, callback_on_step_end_tensor_inputs=["latents", "denoised", "prompt_embeds"])
    assert len(seen) == 9 and not any(inference for _, inference in seen)
    assert not out.images.is_inference()
    out.images.add_(0.0)
    latents = pipe("a cat", num_inference_steps=2, guidance_scale=guidance, generator=gen(0),
                   output_type="latent").images
    assert not latents.is_inference()


def test_model_calls_run_in_inference_mode_unless_turned_off(pipe):
    modes, handle = _mode_per_call(pipe)
    try:
        pipe("a cat", num_inference_steps=2, generator=gen(0), output_type="latent")
        pipe.inference_mode_model_calls = False
        pipe("a cat", num_inference_steps=2, generator=gen(0), output_type="latent")
    finally:
        handle.remove()
    assert modes == [True, True, False, False]


def test_same_images_either_way(sd_pipe):
    a = sd_pipe("a cat", num_inference_steps=3, generator=gen(1), output_type="np").images
    sd_pipe.inference_mode_model_calls = False
    b = sd_pipe("a cat", num_inference_steps=3, generator=gen(1), output_type="np").images
    assert abs(a - b).max() == 0.0


def test_offload_hooks_turn_it_off(sd_pipe):
    # accelerate marks hooked modules with _hf_hook; weights it moves inside the call must stay editable.
    sd_pipe.unet.conv_in._hf_hook = object()
    modes, handle = _mode_per_call(sd_pipe)
    try:
        sd_pipe("a cat", num_inference_steps=1, generator=gen(0), output_type="latent")
    finally:
        handle.remove()
        del sd_pipe.unet.conv_in._hf_hook
    assert modes == [False]
