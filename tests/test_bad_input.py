"""Every bad argument gets the right exception type and a message naming the problem, before model work."""

import math

import pytest
import torch

from .conftest import gen

BAD_CALLS = [
    (dict(prompt=3), TypeError, "prompt must be a string or a non-empty list"),
    (dict(prompt=["a cat", 3]), TypeError, "prompt must be a string"),
    (dict(prompt=[]), TypeError, "non-empty list"),
    (dict(prompt=None), ValueError, "exactly one of prompt and prompt_embeds"),
    (dict(negative_prompt=["a", "b"]), ValueError, "negative_prompt has 2 entries but prompt has 1"),
    (dict(negative_prompt=5), TypeError, "negative_prompt must be a string"),
    (dict(height=33), ValueError, "height must be a multiple of 8, got 33"),
    (dict(width=20), ValueError, "width must be a multiple of 8, got 20"),
    (dict(width=0), ValueError, "width must be an int >= 8"),
    (dict(height=32.0), TypeError, "height must be an int"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be an int >= 1, got 0"),
    (dict(num_inference_steps=-3), ValueError, "num_inference_steps must be an int >= 1, got -3"),
    (dict(num_inference_steps=2.5), TypeError, "num_inference_steps must be an int"),
    (dict(guidance_scale=math.nan), ValueError, r"guidance_scale must be a finite number in \[0, 1000\], got nan"),
    (dict(guidance_scale=-1.0), ValueError, r"guidance_scale must be a finite number in \[0, 1000\]"),
    (dict(guidance_scale=1e30), ValueError, r"guidance_scale must be a finite number in \[0, 1000\], got 1e\+30"),
    (dict(guidance_scale="7"), TypeError, "guidance_scale must be a real number"),
    (dict(guidance_rescale=1.5), ValueError, r"guidance_rescale must be a number in \[0, 1.0\]"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be an int >= 1"),
    (dict(generator=[torch.Generator()] * 3), ValueError, "generator is a list of 3 torch.Generator but this call makes 1 images"),
    (dict(generator=42), TypeError, "generator must be a torch.Generator"),
    (dict(output_type="jpeg"), ValueError, "output_type must be one of"),
    (dict(latents=torch.zeros(1, 4, 3, 3)), ValueError, "latents must have shape"),
    (dict(eta=math.inf), ValueError, "eta must be a finite number"),
    (dict(callback_on_step_end=42), TypeError, "callback_on_step_end must be a callable"),
    (dict(callback_on_step_end=lambda *a: None, callback_on_step_end_tensor_inputs="latents"), TypeError,
     "callback_on_step_end_tensor_inputs must be a list"),
    (dict(callback_on_step_end=lambda *a: None, callback_on_step_end_tensor_inputs=["noise"]), ValueError,
     r"\['noise'\].*allowed"),
    (dict(prompt_embeds=torch.zeros(1, 77)), ValueError, "exactly one of prompt and prompt_embeds"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_CALLS, ids=[str(i) for i in range(len(BAD_CALLS))])
def test_bad_call_arguments(pipe, count_calls, kwargs, error, message):
    calls = count_calls(pipe)
    kwargs = {"prompt": "a cat", "num_inference_steps": 2, "generator": gen(), **kwargs}
    with pytest.raises(error, match=message):
        pipe(**kwargs)
    assert calls.calls == 0  # raised before any model call


def test_prompt_embeds_without_prompt_shape(sd_pipe):
    with pytest.raises(ValueError, match="prompt_embeds must be a 3-D tensor"):
        sd_pipe(prompt_embeds=torch.zeros(1, 77), num_inference_steps=2)


def test_negative_embeds_shape_mismatch(sd_pipe):
    with pytest.raises(ValueError, match="negative_prompt_embeds must have the shape of prompt_embeds"):
        sd_pipe(prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=torch.zeros(2, 77, 32), num_inference_steps=2)


def test_sdxl_needs_pooled_embeds(sdxl_pipe):
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        sdxl_pipe(prompt_embeds=torch.zeros(1, 77, 64), num_inference_steps=2)


def test_sdxl_bad_size_pair(sdxl_pipe):
    with pytest.raises(ValueError, match=r"original_size must be a \(height, width\) pair"):
        sdxl_pipe("a cat", original_size=(1024,), num_inference_steps=2)


def test_guidance_setter_rejects_nan(sd_pipe):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        sd_pipe.guidance_scale = float("nan")


@pytest.mark.parametrize("bad,error,message", [
    (lambda kw: {"latents": kw["latents"].double()}, ValueError, r"'latents' as torch.float64 on cpu at step 0; expected torch.float32"),
    (lambda kw: {"latents": kw["latents"].numpy()}, TypeError, r"'latents' as ndarray at step 0; expected a tensor"),
    (lambda kw: {"noise": kw["latents"]}, ValueError, r"unknown key 'noise' at step 0"),
    (lambda kw: "latents", TypeError, r"must return a dict \(or None\) but returned str at step 0"),
])
def test_bad_callback_returns(sd_pipe, bad, error, message):
    with pytest.raises(error, match=message):
        sd_pipe("a cat", num_inference_steps=2, callback_on_step_end=lambda p, i, t, kw: bad(kw))
    # The pipeline object is still usable afterwards.
    out = sd_pipe("a cat", num_inference_steps=2, output_type="latent")
    assert out.steps_completed == 2


@pytest.mark.parametrize("folder", ["sd_folder", "sd_inpaint_folder"])
def test_more_masks_than_images_is_refused_before_model_work(request, folder, count_calls):
    """mask_image=[mask, mask] for one image passed the checks and failed after two model calls (4-channel UNet:
    the known region put back on two rows of latents). The number of masks (and of images) must be 1, one per
    image of the call, or a number that divides it; checked before the text encoder runs."""
    import stepdiff

    from .conftest import test_image

    pipe = stepdiff.StableDiffusionInpaintPipeline.from_pretrained(request.getfixturevalue(folder))
    pipe.set_progress_bar_config(disable=True)
    calls = count_calls(pipe)
    encoded = []
    handle = pipe.text_encoder.register_forward_pre_hook(lambda *a: encoded.append(1))
    image, mask = test_image()
    kw = dict(image=image, num_inference_steps=2, output_type="latent", generator=gen())
    try:
        with pytest.raises(ValueError, match=r"mask_image holds 2 masks but this call makes 1 image \(1 prompt x "
                                             r"num_images_per_prompt=1\); give 1 mask"):
            pipe("a cat", mask_image=[mask, mask], **kw)
        with pytest.raises(ValueError, match=r"image holds 3 images but this call makes 2 images .*divides 2"):
            pipe(["a cat", "a dog"], image=[image] * 3, mask_image=mask, num_inference_steps=2)
        with pytest.raises(ValueError, match="masked_image_latents holds 2 latents but this call makes 1 image"):
            pipe("a cat", mask_image=mask, masked_image_latents=torch.zeros(2, 4, 16, 16), **kw)
        assert calls.calls == 0 and encoded == []
    finally:
        handle.remove()
    # Two masks for two prompts (or one per image of num_images_per_prompt) are fine.
    assert pipe(["a cat", "a dog"], mask_image=[mask, mask], **{**kw, "generator": None}).images.shape[0] == 2
    assert pipe("a cat", mask_image=[mask, mask], num_images_per_prompt=2, **{**kw, "generator": None}).images.shape[0] == 2


def test_more_images_than_the_call_makes_is_refused_for_image_to_image(sd_folder, count_calls):
    import stepdiff

    from .conftest import test_image

    pipe = stepdiff.StableDiffusionImg2ImgPipeline.from_pretrained(sd_folder)
    calls = count_calls(pipe)
    image, _ = test_image()
    with pytest.raises(ValueError, match=r"image holds 2 images but this call makes 1 image"):
        pipe("a cat", image=[image, image], num_inference_steps=2)
    assert calls.calls == 0
