"""A new family is cheap (issue 23, Measure): a test-only toy family with two kinds, text-to-image and image-to-image,
registered and run through the shared loop and the registry-wide contract checks that apply to it.

What the family took, counted in source places (the target is at most 3):

1. the family module: the classes below (``ToyPipeline`` with its own ``encode`` / ``predict``, and
   ``ToyImg2ImgPipeline``, which is ``ToyPipeline`` with ``kind = Image2ImageKind()``);
2. the registry: one ``PipelineEntry`` line per class in ``pipelines/registry.py`` (``_register`` stands in for it);
3. the signatures: one entry per class in the table of ``pipelines/signatures.py``; a test's classes cannot go in
   that table, so they pass the same ``Signature`` entries to ``classic_call`` here.

Nothing else: no kind, feature, loop, callback, preview or engine module names the family, which
``test_the_family_touched_no_shared_module`` checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from stepdiff.pipelines import registry
from stepdiff.pipelines.base import StepDiffPipeline
from stepdiff.pipelines.checks import pop_prompts, repeat_rows
from stepdiff.pipelines.conditioning import Conditioning
from stepdiff.pipelines.kinds import Image2ImageKind
from stepdiff.pipelines.registry import PipelineEntry, load
from stepdiff.pipelines.signatures import Signature, classic_call

from . import test_pipeline_contract as contract
from .conftest import gen, test_image

IMAGE, _ = test_image()


# ---------------------------------------------------------------------------------------------------------- 1. family


class ToyPipeline(StepDiffPipeline):
    """A toy family: a tiny UNet over 4-channel latents, prompts embedded by their characters (no text encoder)."""

    family = "toy"
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "prompt_embeds", "negative_prompt_embeds", "denoised"]
    _callback_names: ClassVar[dict[str, tuple[str, str]]] = {
        "prompt_embeds": ("cond", "encoder_hidden_states"), "negative_prompt_embeds": ("uncond", "encoder_hidden_states"),
    }

    def __init__(self, vae: Any, unet: Any, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)

    def check_prompts(self, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return pop_prompts(args)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        """(B, 8, 32): each text's characters, a fixed table per character (the toy's text encoder)."""
        table = torch.randn(128, 32, generator=torch.Generator().manual_seed(0))
        codes = [[ord(c) % 128 for c in (t + " " * 8)[:8]] for t in texts]
        return table[torch.tensor(codes)]

    def encode(self, *, device, num_images_per_prompt, height, width, prompt, negative_prompt, prompt_embeds,
               negative_prompt_embeds, clip_skip) -> Conditioning:
        cond = prompt_embeds if prompt_embeds is not None else self._embed(prompt)
        uncond = negative_prompt_embeds
        if uncond is None:
            uncond = self._embed(negative_prompt or [""] * cond.shape[0])
        dtype = self.unet.dtype
        return Conditioning(cond={"encoder_hidden_states": repeat_rows(cond.to(device, dtype), num_images_per_prompt)},
                            uncond={"encoder_hidden_states": repeat_rows(uncond.to(device, dtype), num_images_per_prompt)})

    def predict(self, latent_input: torch.Tensor, timestep: torch.Tensor, conditioning: dict, run: Any) -> torch.Tensor:
        return self.unet(self.extend_model_input(latent_input, conditioning), timestep,
                         encoder_hidden_states=conditioning["encoder_hidden_states"], return_dict=False)[0]

    __call__ = classic_call("ToyPipeline", Signature(
        "prompt height width num_inference_steps guidance_scale negative_prompt num_images_per_prompt generator latents"
        " prompt_embeds negative_prompt_embeds output_type return_dict callback_on_step_end"
        " callback_on_step_end_tensor_inputs", {"num_inference_steps": 50, "guidance_scale": 7.5}, "Toy text to image."))


class ToyImg2ImgPipeline(ToyPipeline):
    kind = Image2ImageKind()

    __call__ = classic_call("ToyImg2ImgPipeline", Signature(
        "prompt image strength num_inference_steps guidance_scale negative_prompt num_images_per_prompt generator"
        " prompt_embeds negative_prompt_embeds output_type return_dict callback_on_step_end"
        " callback_on_step_end_tensor_inputs", {"num_inference_steps": 50, "guidance_scale": 7.5, "strength": 0.8},
        "Toy image to image."))


# ------------------------------------------------------------------------------------------------------- 2. registry

TOY_ENTRIES = (
    PipelineEntry("ToyPipeline", __name__, "toy", "text2image"),
    PipelineEntry("ToyImg2ImgPipeline", __name__, "toy", "image2image"),
)


@pytest.fixture(scope="module")
def _register():
    """The registry lines of the family (in ``REGISTRY`` for a real family), for this module's tests."""
    patch = pytest.MonkeyPatch()
    patch.setattr(registry, "REGISTRY", registry.REGISTRY + TOY_ENTRIES)
    patch.setitem(registry._BY_NAME, "ToyPipeline", TOY_ENTRIES[0])
    patch.setitem(registry._BY_NAME, "ToyImg2ImgPipeline", TOY_ENTRIES[1])
    yield
    patch.undo()


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory, sd_folder, _register) -> Path:
    """A toy model folder in the standard layout (the tiny SD folder's VAE, UNet and scheduler)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    parts = {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "scheduler": EulerDiscreteScheduler}
    loaded = {name: cls.from_pretrained(sd_folder, subfolder=name) for name, cls in parts.items()}
    out = tmp_path_factory.mktemp("tiny-toy")
    ToyPipeline(**loaded).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(params=TOY_ENTRIES, ids=[e.name for e in TOY_ENTRIES])
def case(request, toy_folder):
    entry = request.param
    pipe = load(entry).from_pretrained(toy_folder)  # the real loading path, through the registry
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(contract.EXTRA[entry.kind])


# -------------------------------------------------------------------------------------------- the contract, reused


def test_registered_and_loaded_through_the_registry(case):
    pipe, _ = case
    assert registry.pipeline_for("toy", pipe.kind.name) is not None
    assert isinstance(pipe, StepDiffPipeline) and pipe.family == "toy"


def test_every_tensor_input_reaches_the_callback(case):
    contract.test_every_tensor_input_reaches_the_callback(case)


def test_none_return_means_no_change(case):
    contract.test_none_return_means_no_change(case)


def test_cfg_cutoff_at_batch_2_equals_each_prompt_alone(case):
    contract.test_cutoff_at_batch_2_equals_each_prompt_alone(case)


def test_interrupt_is_clean_and_recorded(case):
    contract.test_interrupt_is_clean_and_recorded(case)


def test_cancel_from_another_thread(case):
    contract.test_cancel_from_another_thread(case)


def test_step_iterator_matches_call(case):
    contract.test_step_iterator_matches_call(case)


def test_callback_errors_name_the_step(case):
    contract.test_callback_errors_name_the_step(case)


def test_early_stop_returns_the_x0_estimate_of_the_step_reached(case):
    pipe, extra = case
    run = pipe.steps(**contract._kwargs(pipe, extra))
    for state in run:
        if state.step_index == 1:
            break
    out = run.finish()
    assert out.interrupted and out.steps_completed == 2 and out.stop_reason == "stopped by caller"
    assert np.isfinite(out.images).all()


def test_image_to_image_starts_from_the_image(toy_folder):
    pipe = ToyImg2ImgPipeline.from_pretrained(toy_folder)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", image=IMAGE, num_inference_steps=4, output_type="np", generator=gen(0))
    low, high = pipe(strength=0.25, **kw), pipe(strength=1.0, **kw)
    assert low.record.steps_total == 1 and high.record.steps_total == 4  # the kind's start in the schedule
    assert low.images.shape == high.images.shape == (1, 32, 32, 3)  # the image's size (size_from_image)


# ------------------------------------------------------------------------------------------------- places counted


def test_the_family_touched_no_shared_module():
    """The family needed no edit outside its module, its registry lines and its signature entries."""
    src = Path(__file__).resolve().parents[1] / "src" / "stepdiff"
    naming = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if "Toy" in p.read_text())
    assert naming == []
    places = {"family module": Path(__file__).name, "registry lines": len(TOY_ENTRIES), "signature entries": 2}
    assert len(places) <= 3
