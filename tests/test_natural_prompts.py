"""Natural prompts on the shipped model: varied captions, their evaluation, and the text-encoder distillation."""

from __future__ import annotations

import json

import numpy as np
import pytest

import stepdiff
from stepdiff.shapes.dataset import COLORS, SHAPES, held_out_combos
from stepdiff.shapes.evaluate import evaluate
from stepdiff.shapes.varied import varied_caption

TEACHER = stepdiff.default_model().parent / "shapes-v2"  # the recipe's teacher: the model before natural prompts


def test_varied_captions_are_deterministic_and_mean_their_combination():
    combo = ("orange", "triangle", "blue")
    a = [varied_caption(combo, np.random.default_rng(s)) for s in range(200)]
    assert a == [varied_caption(combo, np.random.default_rng(s)) for s in range(200)]
    assert len(set(a)) > 150  # varied, not a handful of templates
    for text in a:
        low = text.lower()
        assert "orange" in low and "triangle" in low and "blue background" in low
        others = [w for w in (*COLORS, *SHAPES) if w not in combo and w in low.replace(",", " ").split()]
        assert others == [], text
    assert any(t.isupper() for t in a) and any("," in t for t in a) and any(t.lower().startswith("on ") for t in a)
    assert any(" an orange" in t.lower() or t.lower().startswith("an orange") for t in a)


def test_the_eval_split_has_words_training_never_sees():
    combos = held_out_combos()
    train = {w for s in range(400) for w in varied_caption(combos[s % 24], np.random.default_rng(s), "train")
             .lower().replace(",", " ").replace(".", " ").replace("!", " ").split()}
    evals = {w for s in range(400) for w in varied_caption(combos[s % 24], np.random.default_rng(s), "eval")
             .lower().replace(",", " ").replace(".", " ").replace("!", " ").split()}
    assert {"glossy", "uhd", "atop", "poster"} <= evals - train
    with pytest.raises(ValueError, match="split must be one of"):
        varied_caption(combos[0], np.random.default_rng(0), "test")


def test_evaluate_varied_uses_one_varied_caption_per_pair(monkeypatch):
    pipe = stepdiff.AutoPipelineForText2Image.from_pretrained(stepdiff.default_model())
    seen = []
    real_call = type(pipe).__call__

    def spy(self, *args, **kwargs):
        seen.extend(kwargs["prompt"])
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    row = evaluate(pipe, 7.5, steps=2, seeds_per_combo=1, batch=24, varied=True)
    assert row["prompts"] == "varied" and row["n"] == 24 and len(seen) == 24
    assert seen[0] == varied_caption(held_out_combos()[0], np.random.default_rng(10_000_000), "eval")
    assert len(set(seen)) == 24


def test_distillation_smoke_run_writes_a_loadable_model_and_resumes(tmp_path):
    from tools.train_text_encoder import DistilConfig, distil

    cfg = DistilConfig().smoke_version()
    model = distil(cfg, TEACHER, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "distil_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 2, 4] and all(np.isfinite(r["held_out_loss"]) for r in log)
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(model)
    assert pipe.tokenizer.model_max_length == 77 and pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.tokenizer.convert_tokens_to_ids(",</w>") != pipe.tokenizer.unk_token_id  # punctuation is read
    out = pipe("A Red circle, on an orange background.", num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    distil(cfg, TEACHER, tmp_path / "run")  # finished: resumes at the end, trains nothing more
    again = [json.loads(line) for line in (tmp_path / "run" / "distil_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [0, 2, 4]


def test_publish_writes_a_model_that_says_it_ignores_unknown_words(tmp_path):
    from tools.train_text_encoder import DistilConfig, distil, publish

    distil(DistilConfig().smoke_version(), TEACHER, tmp_path / "run")
    dest = publish(tmp_path / "run", tmp_path / "shapes-vX")
    info = json.loads((dest / "stepdiff.json").read_text())
    assert info["name"] == "shapes-vX" and info["ignores_unknown_words"] is True
    assert set(info["text_encoder_distillation"]["held_out_loss"]) == {"0", "2", "4"}
    config = json.loads((dest / "text_encoder" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    with pytest.raises(FileExistsError, match="already exists"):
        publish(tmp_path / "run", dest)


def test_attention_loss_is_zero_for_the_teacher_itself_and_not_for_another_encoder():
    """Each layer is compared with itself: the teacher reading the canonical captions scores 0 (a layer matched
    with another layer's queries, as named_modules' order would pair them, does not)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from stepdiff.shapes.dataset import caption
    from tools.train_text_encoder import attention_loss

    folder = TEACHER
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    teacher = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    texts = [caption(*c) for c in held_out_combos()[:4]]
    with torch.no_grad():
        emb = teacher(tok(texts, padding="max_length", max_length=16, return_tensors="pt").input_ids)[0]
        teacher_emb = {t: emb[i : i + 1] for i, t in enumerate(texts)}
        x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        same = attention_loss(unet, scheduler, teacher, tok, teacher_emb, texts, texts, x0,
                              torch.Generator().manual_seed(1))
        other = attention_loss(unet, scheduler, teacher, tok, teacher_emb, texts[::-1], texts, x0,
                               torch.Generator().manual_seed(1))
    assert same.item() < 1e-10 and other.item() > 1e-3
