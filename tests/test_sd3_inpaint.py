"""StableDiffusion3InpaintPipeline on the shared loop: parity with diffusers' class on tiny random SD3 models (16 latent
channels, as real SD3 and as the classic pipeline requires; an SD3 transformer and a 33-channel inpainting one), the
official SD3 cutoff callback at batch 2 equal to each prompt alone, the auto pipeline and bad input.
(The contract suite, tests/test_pipeline_contract.py, covers the class through the registry.)"""

import diffusers
import numpy as np
import pytest
import torch

import stepdiff
from stepdiff.callbacks import SD3CFGCutoffCallback

from .conftest import gen

TOL = 1e-4
IMAGE = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
MASK = torch.zeros(1, 1, 32, 32)
MASK[..., 16:] = 1.0  # repaint the right half

CASES = {
    "strength-1": dict(prompt="a photo of a cat", strength=1.0),
    "strength-0.6": dict(prompt="a photo of a cat", strength=0.6),
    "batch2-negatives": dict(prompt=["a cat", "a dog"], negative_prompt=["red", "blue"], strength=0.8),
    "no-cfg-2-per-prompt": dict(prompt="a red car", guidance_scale=1.0, num_images_per_prompt=2, strength=0.7),
}
_cache: dict = {}


def _pair(request, transformer):
    """(stepdiff, diffusers) on one tiny SD3 folder; ``transformer``: "sd3" (16 input channels) or "inpaint" (33)."""
    if transformer not in _cache:
        from stepdiff.testing import make_tiny_sd3

        folder = make_tiny_sd3(request.getfixturevalue("tmp_path_factory").mktemp(f"sd3-16-{transformer}"),
                               latent_channels=16, in_channels=33 if transformer == "inpaint" else None)
        pair = (stepdiff.StableDiffusion3InpaintPipeline.from_pretrained(folder),
                diffusers.StableDiffusion3InpaintPipeline.from_pretrained(folder))
        for p in pair:
            p.set_progress_bar_config(disable=True)
        _cache[transformer] = pair
    return _cache[transformer]


def _kw(**kw):
    return {"image": IMAGE, "mask_image": MASK, "num_inference_steps": 5, "height": 32, "width": 32, **kw}


@pytest.mark.parametrize("transformer", ["sd3", "inpaint"])
@pytest.mark.parametrize("case", CASES)
def test_parity_with_diffusers(request, transformer, case):
    ours, theirs = _pair(request, transformer)
    assert ours.takes_mask_channels() is (transformer == "inpaint")
    a = ours(**_kw(**CASES[case]), generator=gen(0), output_type="latent").images
    b = theirs(**_kw(**CASES[case]), generator=gen(0), output_type="latent").images
    assert a.shape == b.shape and (a - b).abs().max() <= TOL
    # Pictures: the classic inpainting pipeline decodes without the VAE's shift_factor (diffusers #13611), every other
    # SD3 pipeline with it; stepdiff decodes as the others do. With that one line, the pictures agree too.
    vae = theirs.vae
    with torch.no_grad():
        decoded = vae.decode(b / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    expected = theirs.image_processor.postprocess(decoded, output_type="np")
    image = ours(**_kw(**CASES[case]), generator=gen(0), output_type="np").images
    assert np.abs(image - expected).max() <= TOL
    classic = theirs(**_kw(**CASES[case]), generator=gen(0), output_type="np").images
    assert np.abs(classic - expected).max() > 1e-3  # the shift is visible: this is the only difference


@pytest.mark.parametrize("transformer", ["sd3", "inpaint"])
def test_official_sd3_cutoff_at_batch_2_equals_each_prompt_alone(request, transformer):
    ours, _ = _pair(request, transformer)
    prompts, images = ["a photo of a cat", "a red car"], [IMAGE, torch.rand(1, 3, 32, 32, generator=gen(9))]
    masks = [MASK, 1.0 - MASK]
    both = ours(**_kw(prompt=prompts, image=torch.cat(images), mask_image=torch.cat(masks), strength=1.0,
                      num_inference_steps=4), generator=[gen(0), gen(1)], output_type="np",
                callback_on_step_end=SD3CFGCutoffCallback(cutoff_step_ratio=0.5))
    assert both.record.rows_per_step == [4, 4, 4, 2]  # cutoff at step 2, effective from step 3
    for row in (0, 1):
        alone = ours(**_kw(prompt=prompts[row], image=images[row], mask_image=masks[row], strength=1.0,
                           num_inference_steps=4), generator=gen(row), output_type="np",
                     callback_on_step_end=SD3CFGCutoffCallback(cutoff_step_ratio=0.5))
        assert alone.record.rows_per_step == [2, 2, 2, 1]
        assert np.abs(both.images[row] - alone.images[0]).max() <= TOL, row


def test_known_region_is_kept(request):
    ours, _ = _pair(request, "sd3")
    out = ours(**_kw(prompt="a cat", strength=1.0), generator=gen(0), output_type="latent").images
    kept = ours._encode_vae_image(IMAGE * 2 - 1, gen(0))  # the classic helper: what the pipeline puts back
    assert (out[..., :8] - kept[..., :8]).abs().max() <= TOL  # the black (left) half is the image's
    assert (out[..., 8:] - kept[..., 8:]).abs().max() > 1e-2


def test_auto_pipeline_picks_it(sd3_folder, sd_folder):
    pipe = stepdiff.AutoPipelineForInpainting.from_pretrained(sd3_folder)
    assert type(pipe) is stepdiff.StableDiffusion3InpaintPipeline
    assert type(stepdiff.AutoPipelineForInpainting.from_pipe(stepdiff.StableDiffusion3Pipeline.from_pretrained(sd3_folder))) \
        is stepdiff.StableDiffusion3InpaintPipeline
    with pytest.raises(ValueError, match="use stepdiff.StableDiffusionInpaintPipeline"):
        stepdiff.StableDiffusion3InpaintPipeline.from_pretrained(sd_folder)


def test_bad_input_before_model_work(sd3_folder, count_calls):
    pipe = stepdiff.StableDiffusion3InpaintPipeline.from_pretrained(sd3_folder)
    calls = count_calls(pipe)
    image, mask = torch.rand(1, 3, 32, 32), torch.ones(1, 1, 32, 32)
    bad = [
        (dict(mask_image=None), ValueError, "mask_image is required"),
        (dict(mask_image=torch.ones(1, 1, 16, 16)), ValueError, "mask_image is 16x16 but image is 32x32"),
        (dict(mask_image=torch.ones(2, 1, 32, 32)), ValueError, r"mask_image holds 2 masks but this call makes 1 image"),
        (dict(strength=0.0), ValueError, r"strength must be a number in \(0, 1\]"),
        (dict(padding_mask_crop=8), NotImplementedError, "padding_mask_crop"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            pipe("a cat", **{"image": image, "mask_image": mask, "num_inference_steps": 2, **kwargs})
    assert calls.calls == 0
