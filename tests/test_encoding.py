"""Prompts and negative prompts go through each text encoder in one call, with unchanged results."""

import pytest
import torch

import stepdiff

from .conftest import gen


def _count_calls(*modules):
    counts = [0] * len(modules)
    handles = []
    for i, m in enumerate(modules):
        def hook(mod, args, out, i=i):
            counts[i] += 1
        handles.append(m.register_forward_hook(hook))
    return counts, handles


def _run(pipe, **kwargs):
    return pipe(["a red circle", "a cat"], negative_prompt=["blue", "dog"], num_inference_steps=2,
                generator=gen(0), output_type="latent", **kwargs).images


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_each_encoder_runs_once_for_prompts_and_negatives(family, sd_folder, sdxl_folder, sd3_folder):
    cls, folder = {
        "sd": (stepdiff.StableDiffusionPipeline, sd_folder),
        "sdxl": (stepdiff.StableDiffusionXLPipeline, sdxl_folder),
        "sd3": (stepdiff.StableDiffusion3Pipeline, sd3_folder),
    }[family]
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    encoders = [m for m in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
                if m is not None]
    counts, handles = _count_calls(*encoders)
    try:
        batched = _run(pipe)
    finally:
        for h in handles:
            h.remove()
    assert counts == [1] * len(encoders)

    # The same conditioning as encoding prompts and negatives apart (embeddings passed in).
    size = pipe.default_size()
    cond = pipe.encode(device=torch.device("cpu"), num_images_per_prompt=1, height=size, width=size,
                       **_encode_kwargs(family, prompt=["a red circle", "a cat"], negative_prompt=None))
    neg = pipe.encode(device=torch.device("cpu"), num_images_per_prompt=1, height=size, width=size,
                      **_encode_kwargs(family, prompt=["blue", "dog"], negative_prompt=None))
    embeds = {"prompt_embeds": cond.cond["encoder_hidden_states"],
              "negative_prompt_embeds": neg.cond["encoder_hidden_states"]}
    if family != "sd":
        embeds["pooled_prompt_embeds"] = cond.cond[_pooled(family)]
        embeds["negative_pooled_prompt_embeds"] = neg.cond[_pooled(family)]
    apart = pipe(prompt_embeds=embeds.pop("prompt_embeds"), num_inference_steps=2, generator=gen(0),
                 output_type="latent", **embeds).images
    assert (batched - apart).abs().max() <= 1e-4


def _pooled(family):
    return "text_embeds" if family == "sdxl" else "pooled_projections"


def _encode_kwargs(family, **kw):
    base = dict(prompt_embeds=None, negative_prompt_embeds=None, clip_skip=None)
    if family == "sdxl":
        base.update(prompt_2=None, negative_prompt_2=None, pooled_prompt_embeds=None,
                    negative_pooled_prompt_embeds=None, original_size=None, crops_coords_top_left=(0, 0),
                    target_size=None, negative_original_size=None, negative_crops_coords_top_left=(0, 0),
                    negative_target_size=None)
    if family == "sd3":
        base.update(prompt_2=None, prompt_3=None, negative_prompt_2=None, negative_prompt_3=None,
                    pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, max_sequence_length=256)
    return {**base, **kw}


def test_sd3_clip_skip_encodes_prompts_and_negatives_apart(sd3_folder):
    # clip_skip applies to the prompt only (as in diffusers), so the two cannot share a call.
    pipe = stepdiff.StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    pipe.set_progress_bar_config(disable=True)
    counts, handles = _count_calls(pipe.text_encoder)
    try:
        _run(pipe, clip_skip=1)
    finally:
        for h in handles:
            h.remove()
    assert counts == [2]
