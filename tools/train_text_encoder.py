"""Distil a text encoder that reads captions as people write them, for a shapes model whose UNet stays as it is.

    python -m tools.train_text_encoder src/stepdiff/models/shapes-v2 --out runs/te        # full run (settings below)
    python -m tools.train_text_encoder src/stepdiff/models/shapes-v2 --out runs/smoke --smoke
    python -m tools.train_text_encoder src/stepdiff/models/shapes-v2 --out runs/te --publish src/stepdiff/models/shapes-v3

The teacher is the model's own text encoder on the canonical caption ("a red circle on a blue background").
The student is a CLIP text encoder of the same size that reads up to 77 tokens (the teacher reads 16), with
punctuation in its vocabulary, started from the teacher's weights. For a varied caption of the same combination
(``stepdiff.shapes.varied``: articles, capitals, punctuation, word order, framing, filler, unknown words) the loss
is the difference between the frozen UNet's noise predictions with the student's embedding of the varied caption
and with the teacher's embedding of the canonical one, at a random noise level on a real latent of that
combination. Matching through the UNet, not embedding by embedding, lets the student's sequence be longer than the
teacher's. A share of each batch is the canonical caption itself (so the default prompts keep their pictures) and
the empty prompt or a prompt of unknown words only (target: the empty prompt, which is the unconditional side).

Only the training combinations are used; the held-out ones stay for ``stepdiff eval-shapes --varied``.
Every setting is in `DistilConfig`; the seed is fixed. A run that is cut short resumes from its last checkpoint
when started again with the same --out. The result is ``OUT/model``: the input model folder with the new
text_encoder/ and tokenizer/, loadable by stepdiff and diffusers alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import string
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stepdiff.shapes.dataset import caption, held_out_combos, random_sample, render, train_combos
from stepdiff.shapes.varied import _ADJECTIVES, _FILLERS, varied_caption
from tools.train_shapes import _Checkpoints, _cosine_lr, _to_tensor

__all__ = ["DistilConfig", "distil", "publish"]


@dataclass
class DistilConfig:
    seed: int = 0
    threads: int = 1
    steps: int = 1000
    batch: int = 48
    lr: float = 5e-4
    warmup: int = 100
    max_length: int = 77
    canonical_share: float = 0.2  # the canonical caption itself
    empty_share: float = 0.08  # "" or unknown words only -> the empty prompt
    latents_per_combo: int = 12
    loss: str = "attention"  # LOSSES: "attention" (layer by layer) or "noise" (the first recipe's)
    checkpoint_every: int = 250
    eval_every: int = 250
    smoke: bool = False

    def smoke_version(self) -> DistilConfig:
        return dataclasses.replace(self, steps=4, batch=4, latents_per_combo=1, checkpoint_every=2, eval_every=2,
                                   smoke=True)


def build_tokenizer(teacher_dir: Path, out: Path, max_length: int) -> CLIPTokenizer:
    """The teacher's BPE vocabulary (same ids) plus ASCII punctuation, reading ``max_length`` tokens."""
    vocab = json.loads((teacher_dir / "vocab.json").read_text())
    for ch in string.punctuation:
        for token in (ch, ch + "</w>"):
            vocab.setdefault(token, len(vocab))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    shutil.copy(teacher_dir / "merges.txt", out / "merges.txt")
    return CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"), model_max_length=max_length)


def build_student(teacher: CLIPTextModel, vocab_size: int, max_length: int) -> CLIPTextModel:
    """The teacher's architecture with a longer position table and a larger vocabulary, started from its weights."""
    cfg = teacher.config.to_dict()
    cfg.update(vocab_size=vocab_size, max_position_embeddings=max_length)
    for key in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    student = CLIPTextModel(CLIPTextConfig(**cfg))
    state = {k: v.float() for k, v in teacher.state_dict().items()}
    key = {k.rsplit("embeddings.", 1)[-1]: k for k in state if "embeddings." in k}
    tok = state.pop(key["token_embedding.weight"])
    pos = state.pop(key["position_embedding.weight"])
    state.pop(key.get("position_ids", ""), None)
    missing = student.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    with torch.no_grad():
        emb = getattr(student, "text_model", student).embeddings
        emb.token_embedding.weight[: tok.shape[0]] = tok
        emb.token_embedding.weight[tok.shape[0]:] = tok.mean(0)
        emb.position_embedding.weight[: pos.shape[0]] = pos
        emb.position_embedding.weight[pos.shape[0]:] = pos[-1]  # beyond 16: the teacher's last padding position
    return student


def _unknown_only(rng: np.random.Generator) -> str:
    words = list(rng.choice(_FILLERS["train"] + _ADJECTIVES["train"], size=int(rng.integers(1, 4)), replace=False))
    return ", ".join(str(w) for w in words)


@torch.no_grad()
def _latent_pool(vae: AutoencoderKL, combos: list, per_combo: int, seed: int) -> torch.Tensor:
    """(len(combos), per_combo, 4, h, w): scaled VAE means of renders of each combination."""
    rng = np.random.default_rng(seed)
    out = []
    for combo in tqdm(combos, desc="latents", leave=False):
        images = np.stack([np.asarray(render(random_sample(rng, combo))) for _ in range(per_combo)])
        out.append(vae.encode(_to_tensor(images)).latent_dist.mean * vae.config.scaling_factor)
    return torch.stack(out)


class _Batches:
    """Captions, teacher targets and latents for one step; each step's randomness is its own (resumable)."""

    def __init__(self, cfg: DistilConfig, combos: list, pool: torch.Tensor, split: str) -> None:
        self.cfg, self.combos, self.pool, self.split = cfg, combos, pool, split

    def __call__(self, step: int, seed: int):
        rng = np.random.default_rng([seed, step])
        texts, targets, x0 = [], [], []
        for _ in range(self.cfg.batch):
            i = int(rng.integers(len(self.combos)))
            combo = self.combos[i]
            r = rng.random()
            if r < self.cfg.empty_share:
                texts.append("" if rng.random() < 0.5 else _unknown_only(rng))
                targets.append("")
            elif r < self.cfg.empty_share + self.cfg.canonical_share:
                texts.append(caption(*combo))
                targets.append(caption(*combo))
            else:
                texts.append(varied_caption(combo, rng, self.split))
                targets.append(caption(*combo))
            x0.append(self.pool[i, int(rng.integers(self.pool.shape[1]))])
        return texts, targets, torch.stack(x0), torch.Generator().manual_seed(seed * 100_003 + step)


def _noised(scheduler, x0, gen):
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    return scheduler.add_noise(x0, noise, t), t


def _student_embeddings(student, tokenizer, texts):
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return student(ids)[0]


def noise_loss(unet, scheduler, student, tokenizer, teacher_emb, texts, targets, x0, gen) -> torch.Tensor:
    """MSE between the UNet's noise predictions with the student's and the teacher's embeddings (first recipe)."""
    xt, t = _noised(scheduler, x0, gen)
    with torch.no_grad():
        target = unet(xt, t, encoder_hidden_states=torch.cat([teacher_emb[c] for c in targets])).sample
    pred = unet(xt, t, encoder_hidden_states=_student_embeddings(student, tokenizer, texts)).sample
    return F.mse_loss(pred, target)


def attention_loss(unet, scheduler, student, tokenizer, teacher_emb, texts, targets, x0, gen) -> torch.Tensor:
    """Mean over the UNet's cross-attention layers of MSE(layer(q, student), layer(q, teacher)) / Var(layer(q,
    teacher)), with q each layer's input in the teacher's pass at a random noise level.

    The text reaches an SD UNet only through its cross-attention layers, so when every layer's output matches, the
    noise prediction is the teacher's. Matched layer by layer, the signal is dense: matched on the noise prediction
    alone (``noise_loss``), text-dependent differences are a small part of the error (the whole conditional minus
    unconditional difference is ~0.01 MSE on the shipped model) and the student learnt slowly.
    """
    xt, t = _noised(scheduler, x0, gen)
    layers = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    # (layer, its input, its output) in the order the layers run (named_modules lists the mid block last)
    seen: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out))) for m in layers]
    try:
        with torch.no_grad():
            unet(xt, t, encoder_hidden_states=torch.cat([teacher_emb[c] for c in targets]))
    finally:
        for h in hooks:
            h.remove()
    emb = _student_embeddings(student, tokenizer, texts)
    losses = [F.mse_loss(layer(q, encoder_hidden_states=emb), out) / out.var().clamp_min(1e-8)
              for layer, q, out in seen]
    return torch.stack(losses).mean()


LOSSES = {"attention": attention_loss, "noise": noise_loss}


def distil(cfg: DistilConfig, model_dir: Path, out: Path) -> Path:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distil_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {cfg.loss!r}")
    loss_fn = LOSSES[cfg.loss]
    ck = _Checkpoints(out / "checkpoints")
    started = time.time()
    teacher_tok = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    teacher = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32).eval()
    unet.requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32).eval()
    scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    tokenizer = build_tokenizer(model_dir / "tokenizer", out / "tokenizer_build", cfg.max_length)
    student = build_student(teacher, len(tokenizer), cfg.max_length)
    combos, held = train_combos(), held_out_combos()
    if cfg.smoke:
        combos, held = combos[:3], held[:2]
    with torch.no_grad():
        canon = ["", *(caption(*c) for c in combos + held)]
        ids = teacher_tok(canon, padding="max_length", max_length=teacher_tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
        emb = teacher(ids)[0]
        teacher_emb = {c: emb[i : i + 1] for i, c in enumerate(canon)}
    pool = ck.load("pool")
    if pool is None:
        pool = {"train": _latent_pool(vae, combos, cfg.latents_per_combo, cfg.seed + 1),
                "held": _latent_pool(vae, held, max(1, cfg.latents_per_combo // 2), cfg.seed + 2)}
        ck.save("pool", pool)
    batches = _Batches(cfg, combos, pool["train"], "train")
    held_batches = _Batches(dataclasses.replace(cfg, empty_share=0.0, canonical_share=0.0), held, pool["held"], "eval")
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = 0
    state = ck.load("student")
    if state is not None:
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    log = out / "distil_log.jsonl"

    def held_loss() -> float:
        student.eval()
        with torch.no_grad():
            losses = [loss_fn(unet, scheduler, student, tokenizer, teacher_emb, *held_batches(k, 10_000 + cfg.seed)).item()
                      for k in range(2 if cfg.smoke else 8)]
        student.train()
        return float(np.mean(losses))

    if start == 0:
        with log.open("a") as f:
            f.write(json.dumps({"step": 0, "held_out_loss": held_loss(), "time": time.time()}) + "\n")
    student.train()
    bar = tqdm(range(start, cfg.steps), desc="text encoder", initial=start, total=cfg.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _cosine_lr(step, cfg.steps, cfg.warmup)
        loss = loss_fn(unet, scheduler, student, tokenizer, teacher_emb, *batches(step, cfg.seed))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            with log.open("a") as f:
                f.write(json.dumps({"step": step + 1, "train_loss": loss.item(), "held_out_loss": held_loss(),
                                    "time": time.time()}) + "\n")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            ck.save("student", {"student": student.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    model = out / "model"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(model_dir, model, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    # float32 (0.6 MB): diffusers' own loader keeps a transformers model in its saved dtype, and a float16 text
    # encoder beside a float32 UNet fails on a CPU there.
    student.eval().save_pretrained(model / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(model / "tokenizer")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(out / "tokenizer_build" / name, model / "tokenizer" / name)
    (out / "distil_time.json").write_text(json.dumps({
        "wall_seconds_this_invocation": time.time() - started, "resumed_from_step": start,
    }))
    print(f"saved {model} after {(time.time() - started) / 60:.1f} min")
    return model


def publish(run: Path, dest: Path, name: str | None = None, overwrite: bool = False) -> Path:
    """Copy ``run``'s finished model to ``dest`` as a shipped model: its stepdiff.json names it, says that it ignores
    words it does not know, and records the distillation's settings, time and held-out losses."""
    if not (run / "model" / "model_index.json").is_file():
        raise FileNotFoundError(f"run={str(run)!r} has no finished model/ folder; run the distillation first")
    if dest.exists():
        if not overwrite:
            raise FileExistsError(f"dest={str(dest)!r} already exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(dest)
    shutil.copytree(run / "model", dest)
    encoder = CLIPTextModel.from_pretrained(dest / "text_encoder", torch_dtype=torch.float32)
    shutil.rmtree(dest / "text_encoder")
    encoder.save_pretrained(dest / "text_encoder", safe_serialization=True)
    table = dest / "latent_rgb.json"  # the same VAE, so the same fitted preview table, under the new name
    if table.is_file():
        data = json.loads(table.read_text())
        data["name"] = f"fitted:{name or dest.name}"
        table.write_text(json.dumps(data, indent=1) + "\n")
    info = json.loads((dest / "stepdiff.json").read_text())
    log = [json.loads(line) for line in (run / "distil_log.jsonl").read_text().splitlines()]
    info.update(
        name=name or dest.name,
        ignores_unknown_words=True,
        prompt_note="reads captions as people write them: articles, capitals, punctuation, word order, framing "
                    "and filler; words outside the vocabulary are ignored",
        text_encoder_distillation={
            "teacher": info.get("name"),
            "config": json.loads((run / "distil_config.json").read_text()),
            "time": json.loads((run / "distil_time.json").read_text()),
            "held_out_loss": {str(r["step"]): r["held_out_loss"] for r in log},
        },
    )
    (dest / "stepdiff.json").write_text(json.dumps(info, indent=1) + "\n")
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Distil a text encoder that reads natural captions for a shapes model.")
    parser.add_argument("model", type=Path, help="the shapes model folder (teacher text encoder, frozen UNet)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log, final model/)")
    parser.add_argument("--smoke", action="store_true", help="a few steps only, to check the script runs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {DistilConfig.steps})")
    parser.add_argument("--publish", type=Path, default=None, metavar="DEST",
                        help="afterwards, copy the model to DEST as a shipped model (src/stepdiff/models/NAME)")
    parser.add_argument("--overwrite", action="store_true", help="replace --publish DEST if it exists")
    args = parser.parse_args(argv)
    if args.publish is not None and args.publish.exists() and not args.overwrite:
        parser.error(f"--publish {args.publish} already exists; pass --overwrite to replace it")
    cfg = DistilConfig()
    if args.smoke:
        cfg = cfg.smoke_version()
    if args.threads is not None:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    distil(cfg, args.model, args.out)
    if args.publish is not None:
        print(publish(args.out, args.publish, overwrite=args.overwrite))


if __name__ == "__main__":
    main()
