"""The UNet's text-independent prefix runs once per guided batch, with the same images as before."""

import pytest
import torch

import stepdiff
from stepdiff.sharing import shared_prefix, shared_prefix_modules


def _rows_seen(modules):
    """Batch rows of the first input each module's forward received, in call order."""
    seen = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args, kwargs, name=name: seen.append((name, _rows(args, kwargs))),
                                    with_kwargs=True)
        for name, m in modules.items()
    ]
    return seen, handles


def _rows(args, kwargs):
    first = args[0] if args else next(iter(kwargs.values()))
    return first.shape[0]


def _generate(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    return pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


def test_tiny_sd_shares_conv_in_the_plain_down_block_and_the_first_resnet(sd_pipe):
    unet = sd_pipe.unet
    # make_tiny_sd: DownBlock2D, then CrossAttnDownBlock2D
    assert shared_prefix_modules(unet) == [unet.conv_in, unet.down_blocks[0], unet.down_blocks[1].resnets[0]]


def test_shared_modules_see_half_the_rows_and_everything_else_all(sd_pipe):
    unet = sd_pipe.unet
    watched = {
        "conv_in": unet.conv_in, "down0": unet.down_blocks[0], "resnet1.0": unet.down_blocks[1].resnets[0],
        "attn1.0": unet.down_blocks[1].attentions[0], "up0": unet.up_blocks[0],
    }
    seen, handles = _rows_seen(watched)
    try:
        _generate(sd_pipe, num_inference_steps=2)
    finally:
        for h in handles:
            h.remove()
    rows = dict(seen)  # last call's rows per module
    assert rows == {"conv_in": 2, "down0": 2, "resnet1.0": 2, "attn1.0": 4, "up0": 4}  # 2 prompts, guided: 4 rows
    assert len(seen) == 2 * len(watched)


def test_sharing_changes_no_image(sd_pipe):
    shared = _generate(sd_pipe)
    sd_pipe.share_guidance_prefix = False
    plain = _generate(sd_pipe)
    assert abs(shared - plain).max() < 1e-5


def test_unguided_steps_are_not_halved(sd_pipe):
    seen, handles = _rows_seen({"conv_in": sd_pipe.unet.conv_in})
    try:
        _generate(sd_pipe, num_inference_steps=2, guidance_scale=1.0)
    finally:
        for h in handles:
            h.remove()
    assert [rows for _, rows in seen] == [2, 2]


def test_prompt_dependent_time_embedding_shares_nothing(sdxl_pipe):
    assert sdxl_pipe.unet.config.addition_embed_type == "text_time"
    assert shared_prefix_modules(sdxl_pipe.unet) == []


def test_hooks_are_removed_even_when_the_model_call_fails(sd_pipe):
    unet = sd_pipe.unet
    before = {id(m): (len(m._forward_pre_hooks), len(m._forward_hooks)) for m in unet.modules()}
    with pytest.raises(RuntimeError, match="boom"):
        with shared_prefix(unet) as shared:
            assert shared == 3
            raise RuntimeError("boom")
    after = {id(m): (len(m._forward_pre_hooks), len(m._forward_hooks)) for m in unet.modules()}
    assert after == before


def test_shipped_model_shares_its_plain_16x16_block():
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(stepdiff.default_model())
    unet = pipe.unet
    assert shared_prefix_modules(unet) == [unet.conv_in, unet.down_blocks[0], unet.down_blocks[1].resnets[0]]
