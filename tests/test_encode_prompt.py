"""``encode_prompt`` on every registered pipeline (every family and kind, ControlNet ones included): the classic
parameter names and the same tensors as the classic class of the same name, on identical weights.
(The family pipelines' details: test_drop_in.test_encode_prompt_has_the_classic_signature_and_values.)"""

import inspect

import diffusers
import pytest
import torch

from stepdiff.pipelines.registry import REGISTRY, load

TOL = 1e-4
FOLDERS = {"sd": "sd_folder", "sdxl": "sdxl_folder", "sd3": "sd3_folder", "flux": "flux_folder"}


def _load(cls, folder, controlnet):
    kwargs = {"controlnet": controlnet} if controlnet is not None else {}
    if "safety_checker" in inspect.signature(cls.__init__).parameters:
        kwargs["safety_checker"] = None
    return cls.from_pretrained(folder, **kwargs)


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.name for e in REGISTRY])
def test_encode_prompt_matches_the_classic_class_of_the_same_name(request, entry):
    ours_cls, theirs_cls = load(entry), getattr(diffusers, entry.name)
    params = inspect.signature(theirs_cls.encode_prompt).parameters
    assert list(inspect.signature(ours_cls.encode_prompt).parameters) == list(params)
    folder = request.getfixturevalue(FOLDERS[entry.family])
    controlnet = None
    if entry.controlnet:
        controlnet = diffusers.ControlNetModel.from_pretrained(request.getfixturevalue(f"{entry.family}_controlnet_folder"))
    ours, theirs = _load(ours_cls, folder, controlnet), _load(theirs_cls, folder, controlnet)
    kw = dict(prompt=["a photo of a cat", "a red car"], device="cpu", num_images_per_prompt=2,
              do_classifier_free_guidance=True, negative_prompt=["a dog", "a blue road"])
    kw = {k: v for k, v in kw.items() if k in params}  # Flux's encodes one side, without the CFG flag
    for extra in ("prompt_2", "prompt_3"):
        if extra in params:
            kw[extra] = ["a photo of a bear", "a blue car"]  # the second (third) encoder sees other prompts
    if "negative_prompt_2" in params:
        kw["negative_prompt_2"] = ["best quality", "a road"]
    a, b = ours.encode_prompt(**kw), theirs.encode_prompt(**kw)
    assert type(a) is tuple and len(a) == len(b) and len(a) in (2, 3, 4)
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.allclose(x, y, atol=TOL)
    assert a[0].shape[0] == 4  # 2 prompts x 2 images
