"""Textual inversion on SDXL, as diffusers documents it: one embedding per text encoder (``clip_l`` for the first,
``clip_g`` for the second), loaded twice with ``text_encoder=`` / ``tokenizer=``. (SD: tests/test_drop_in.py.)"""

import diffusers
import numpy as np
import torch
from safetensors.torch import load_file, save_file

import stepdiff

from .conftest import gen

TOL = 1e-4


def _load_embedding(pipe, path, token="<toy>"):
    """The documented SDXL recipe, word for word."""
    state_dict = load_file(path)
    pipe.load_textual_inversion(state_dict["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state_dict["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)


def _images(pipe, prompt):
    return pipe(prompt, num_inference_steps=2, output_type="np", generator=gen(0)).images


def test_sdxl_textual_inversion_changes_only_prompts_with_its_token_and_matches_diffusers(sdxl_folder, tmp_path):
    ours = stepdiff.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    width_l, width_g = ours.text_encoder.config.hidden_size, ours.text_encoder_2.config.hidden_size
    path = tmp_path / "toy-xl.safetensors"  # a two-vector embedding, in the layout of the published SDXL ones
    save_file({"clip_l": torch.randn(2, width_l), "clip_g": torch.randn(2, width_g)}, path)
    before = _images(ours, "a photo of a cat")

    for p in (ours, theirs):
        _load_embedding(p, path)
    # both tokenizers now expand the token into its vectors
    assert ours.maybe_convert_prompt("a <toy>", ours.tokenizer) == "a <toy> <toy>_1"
    assert ours.maybe_convert_prompt("a <toy>", ours.tokenizer_2) == "a <toy> <toy>_1"
    assert np.abs(_images(ours, "a photo of a cat") - before).max() <= 1e-6  # no token, no change
    with_token = _images(ours, "a photo of a <toy>")
    assert np.abs(with_token - before).max() > 1e-3
    assert np.abs(with_token - _images(theirs, "a photo of a <toy>")).max() <= TOL
    # and the embedding reaches both encoders: the same vectors under each encoder's own name
    ids = [tok.convert_tokens_to_ids(["<toy>", "<toy>_1"]) for tok in (ours.tokenizer, ours.tokenizer_2)]
    state = load_file(path)
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight[ids[0]], state["clip_l"])
    assert torch.equal(ours.text_encoder_2.get_input_embeddings().weight[ids[1]], state["clip_g"])
