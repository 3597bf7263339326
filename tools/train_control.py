"""Train the shipped ControlNet (shapes-control) for the shipped shapes model, from scratch.

    python -m tools.train_control --base src/stepdiff/models/shapes-v2 --out runs/control   # full run
    python -m tools.train_control --base ... --out runs/smoke --smoke                          # a few steps
    python -m tools.train_control --base ... --out runs/control --publish src/stepdiff/models/shapes-control-v1

The condition is the shape's silhouette (white on black, the output size; `stepdiff.shapes.dataset.silhouette`).
The ControlNet starts as `ControlNetModel.from_unet` of the base UNet (the ControlNet paper's recipe, Zhang et
al. 2023: a trainable copy of the encoder joined to the frozen model by zero convolutions) and is trained with the
base UNet, VAE and text encoder frozen. Every setting is in `ControlConfig`; the seed is fixed; a run that is cut
short resumes from its last checkpoint when started again with the same --out. The result, `OUT/controlnet/`, is
a standard `ControlNetModel` folder (config.json + fp16 safetensors) that stepdiff and diffusers both load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from stepdiff.shapes.dataset import random_sample, render, silhouette, train_combos
from tools.train_shapes import _Checkpoints, _cosine_lr, _to_tensor, ema_update, min_snr_loss, noised

__all__ = ["ControlConfig", "publish", "train_control"]


@dataclass
class ControlConfig:
    seed: int = 0
    threads: int = 2
    num_train_images: int = 20_000
    steps: int = 2000
    batch: int = 32
    lr: float = 4e-4
    warmup: int = 100
    # One stride-2 stage per VAE downsampling (f=4 here): the control image arrives at the latents' size.
    conditioning_embedding: tuple[int, ...] = (16, 32, 64)
    caption_dropout: float = 0.1  # as the base model: the ControlNet also learns the unconditional branch
    min_snr_gamma: float = 5.0  # Min-SNR weighting, Hang et al. 2023 (the base model's loss)
    offset_noise: float = 0.05
    ema_decay: float = 0.995
    checkpoint_every: int = 200
    smoke: bool = False

    def smoke_version(self) -> ControlConfig:
        return dataclasses.replace(self, num_train_images=16, steps=3, batch=4, warmup=1, checkpoint_every=2, smoke=True)


@torch.no_grad()
def make_dataset(cfg: ControlConfig, base: Path, ck: _Checkpoints) -> dict:
    """Latents (scaled), silhouettes (uint8), caption index per image and the text embeddings of every caption."""
    state = ck.load("data")
    if state is not None:
        return state
    rng = np.random.default_rng(cfg.seed + 11)
    combos = train_combos()
    images = np.empty((cfg.num_train_images, 64, 64, 3), dtype=np.uint8)
    controls = np.empty((cfg.num_train_images, 64, 64), dtype=np.uint8)
    captions: list[str] = []
    for i in tqdm(range(cfg.num_train_images), desc="render"):
        sample = random_sample(rng, combos[int(rng.integers(len(combos)))])
        images[i] = np.asarray(render(sample))
        controls[i] = np.asarray(silhouette(sample))[..., 0]
        captions.append(sample.caption)
    vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32).eval()
    chunks = [vae.encode(_to_tensor(images[i : i + 256])).latent_dist.mean for i in range(0, len(images), 256)]
    latents = torch.cat(chunks) * vae.config.scaling_factor
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=torch.float32).eval()
    unique = sorted(set(captions))
    ids = tokenizer([*unique, ""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    embeddings = text_encoder(ids)[0]  # (captions + 1, tokens, width); the last row is the empty prompt
    index = {c: i for i, c in enumerate(unique)}
    state = {
        "latents": latents, "controls": torch.from_numpy(controls), "embeddings": embeddings,
        "caption_index": torch.tensor([index[c] for c in captions]), "captions": unique,
    }
    ck.save("data", state)
    return state


def build_controlnet(cfg: ControlConfig, unet: UNet2DConditionModel) -> ControlNetModel:
    return ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=cfg.conditioning_embedding, conditioning_channels=3,
    )


def train_control(cfg: ControlConfig, base: Path, out: Path) -> Path:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "control_config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "base": str(base)}, indent=1))
    ck = _Checkpoints(out / "checkpoints")
    started = time.time()
    data = make_dataset(cfg, base, ck)
    unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32).eval()
    unet.requires_grad_(False)
    controlnet = build_controlnet(cfg, unet)
    params = list(controlnet.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    start = 0
    state = ck.load("controlnet")
    if state is not None:
        controlnet.load_state_dict(state["controlnet"])
        opt.load_state_dict(state["opt"])
        ema, start = state["ema"], state["step"]
    # The base model's noise schedule (its scheduler config), as a DDPM scheduler for add_noise.
    noise_scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(base / "scheduler"))
    acp = noise_scheduler.alphas_cumprod
    snr = acp / (1 - acp)
    latents, controls, embeddings, caption_index = (
        data["latents"], data["controls"], data["embeddings"], data["caption_index"])
    empty = len(embeddings) - 1
    gen = torch.Generator()
    controlnet.train()
    log = (out / "train_log.jsonl").open("a")
    bar = tqdm(range(start, cfg.steps), desc="controlnet", initial=start, total=cfg.steps)
    for step in bar:
        gen.manual_seed(cfg.seed + 13 + step)  # resumable: each step's randomness is its own
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _cosine_lr(step, cfg.steps, cfg.warmup)
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        x0 = latents[idx]
        cond = controls[idx].float().div(255.0)[:, None].expand(-1, 3, -1, -1)  # [0, 1], as pipelines feed it
        which = caption_index[idx].clone()
        which[torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout] = empty
        text = embeddings[which]
        noise, t, xt = noised(x0, gen, cfg.offset_noise, noise_scheduler)
        down, mid = controlnet(xt, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        pred = unet(xt, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        loss = min_snr_loss(pred, noise, snr, t, cfg.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, params, step, cfg.ema_decay)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.write(json.dumps({"step": step, "loss": loss.item(), "time": time.time()}) + "\n")
            log.flush()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            ck.save("controlnet", {"controlnet": controlnet.state_dict(), "opt": opt.state_dict(), "ema": ema,
                                   "step": step + 1})
    log.close()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    folder = out / "controlnet"
    controlnet.eval().to(torch.float16).save_pretrained(folder, safe_serialization=True)
    (out / "train_time.json").write_text(json.dumps({
        "wall_seconds_this_invocation": time.time() - started, "resumed_from_step": start,
    }))
    print(f"saved {folder} after {(time.time() - started) / 60:.1f} min")
    return folder


def publish(run: Path, dest: Path, overwrite: bool = False) -> Path:
    """Copy a finished run's ControlNet into ``dest`` (the package's models folder), with stepdiff.json: the base
    model it was trained for, every training setting and the wall time."""
    import shutil

    if not (run / "controlnet" / "config.json").is_file():
        raise FileNotFoundError(f"run={str(run)!r} has no finished controlnet/ folder; train it first")
    if dest.exists():
        if not overwrite:
            raise FileExistsError(f"dest={str(dest)!r} already exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(dest)
    shutil.copytree(run / "controlnet", dest)
    for f in dest.iterdir():
        f.chmod(0o644)
    config = json.loads((run / "control_config.json").read_text())
    info = {
        "name": dest.name,
        "base_model": Path(config.pop("base")).name,
        "condition": "the shape's silhouette, white on black, RGB, at the output size (stepdiff.shapes.dataset.silhouette)",
        "train_config": config,
        "train_time": json.loads((run / "train_time.json").read_text()),
    }
    (dest / "stepdiff.json").write_text(json.dumps(info, indent=1) + "\n")
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the shipped shapes ControlNet (silhouette condition).")
    parser.add_argument("--base", type=Path, required=True, help="the shapes model folder it controls")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, final controlnet/)")
    parser.add_argument("--smoke", action="store_true", help="a few steps only, to check the script runs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: ControlConfig.steps)")
    parser.add_argument("--publish", type=Path, default=None, metavar="DEST",
                        help="after training (or at once, for a finished run), copy the ControlNet here")
    parser.add_argument("--overwrite", action="store_true", help="with --publish: replace an existing DEST")
    args = parser.parse_args(argv)
    cfg = ControlConfig()
    if args.smoke:
        cfg = cfg.smoke_version()
    if args.threads is not None:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if not (args.out / "controlnet" / "config.json").is_file():
        train_control(cfg, args.base, args.out)
    if args.publish is not None:
        print(f"published {publish(args.out, args.publish, args.overwrite)}")


if __name__ == "__main__":
    main()
