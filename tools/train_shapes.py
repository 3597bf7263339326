"""Train the shipped shapes model from scratch: VAE, then text encoder + UNet.

    python -m tools.train_shapes --out runs/shapes            # full run (settings below)
    python -m tools.train_shapes --out runs/shapes --stage vae  # stop after the VAE stage
    python -m tools.train_shapes --out runs/smoke --smoke     # a few steps, for CI
    python -m tools.train_shapes --out runs/v1 --recipe v1    # the shapes-v1 recipe

Every setting is in `TrainConfig`; the seed is fixed. A run that is cut short resumes from its
last checkpoint when started again with the same --out. The result is a standard Stable
Diffusion folder (model_index.json + one folder per component, fp16 safetensors) that both stepdiff
and diffusers load, plus a tiny preview decoder distilled from the VAE in preview_decoder/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers import StableDiffusionPipeline as _DiffusersSD
from diffusers.schedulers import DPMSolverMultistepScheduler
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

import stepdiff
from stepdiff.preview import PREVIEW_DECODER_DIR
from stepdiff.shapes.dataset import EVAL_SEED_BASE, IMAGE_SIZE, VOCABULARY, all_combos, sample_batch
from stepdiff.tokenizer import build_clip_tokenizer
from tools.distill_preview import DistillConfig, distill

__all__ = ["TrainConfig", "train"]


STAGES = ("vae", "all")  # vae: the VAE and the encoded training latents, then stop


@dataclass
class TrainConfig:
    """The shapes-v2 recipe; ``TrainConfig.v1()`` is the shapes-v1 one."""

    seed: int = 0
    threads: int = 2
    # VAE: f=4 (3 blocks), 4 latent channels -> 4x16x16 latents for 64x64 images.
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_attention: bool = False  # self-attention in the VAE's mid block (v1 had it)
    # GroupNorm groups. v1's 16 groups on 16 full-resolution channels is instance norm there: it removes each
    # channel's mean over the image, so flat colours cannot pass through it and the VAE learned to carry them
    # in a marker blob at the shape's edge (the coloured glitch).
    vae_norm_groups: int = 1
    # Start with a near-deterministic posterior (log-variance -6). v1 set the bias on the encoder's output, but
    # the random 1x1 quant_conv after it mixed it into the means and left the posterior std near 2 at the start.
    vae_identity_quant_conv: bool = True
    vae_steps: int = 4000
    vae_batch: int = 8
    vae_lr: float = 1e-3
    vae_warmup: int = 100
    vae_kl_weight: float = 1e-6
    # Extra weight on pixels within 1 px of an outline, where v1's VAE left its coloured glitch.
    vae_edge_weight: float = 4.0
    # Latents are precomputed once for a fixed training set.
    num_train_images: int = 40_000
    # Text encoder + UNet, trained jointly.
    text_layers: int = 3
    text_width: int = 64
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 4e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0  # Min-SNR weighting, Hang et al. 2023
    offset_noise: float = 0.05  # helps plain dark/bright backgrounds (Guttenberg 2023)
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    smoke: bool = False

    @classmethod
    def v1(cls) -> TrainConfig:
        """The settings shapes-v1 was trained with."""
        return cls(vae_attention=True, vae_norm_groups=16, vae_identity_quant_conv=False, vae_steps=1400, vae_batch=32,
                   vae_lr=1e-3, vae_edge_weight=0.0)

    def smoke_version(self) -> TrainConfig:
        return dataclasses.replace(
            self, vae_steps=3, vae_batch=4, num_train_images=64, unet_steps=3, unet_batch=4,
            warmup_steps=1, checkpoint_every=2, smoke=True,
        )


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def noised(x0: torch.Tensor, gen: torch.Generator, offset_noise: float, scheduler: DDPMScheduler):
    """(noise, timesteps, noisy latents) for a training batch: Gaussian noise plus offset noise (one value per
    image and channel), uniform timesteps."""
    noise = torch.randn(x0.shape, generator=gen)
    noise += offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    return noise, t, scheduler.add_noise(x0, noise, t)


def min_snr_loss(pred: torch.Tensor, noise: torch.Tensor, snr: torch.Tensor, t: torch.Tensor, gamma: float):
    """Epsilon-prediction MSE with Min-SNR-gamma weighting (Hang et al. 2023)."""
    weight = torch.clamp(snr[t], max=gamma) / snr[t]
    return (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], step: int, decay: float) -> None:
    """EMA of the weights, with the usual warm-up of the decay over the first steps."""
    torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(decay, (1 + step) / (10 + step)))


def build_vae(cfg: TrainConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=cfg.vae_norm_groups,
        sample_size=IMAGE_SIZE, mid_block_add_attention=cfg.vae_attention,
    )
    with torch.no_grad():  # start with a near-deterministic posterior: trains far faster
        vae.encoder.conv_out.bias[4:].fill_(-6.0)
        if cfg.vae_identity_quant_conv:
            vae.quant_conv.weight.copy_(torch.eye(8)[:, :, None, None])
            vae.quant_conv.bias.zero_()
    return vae


def build_unet(cfg: TrainConfig, sample_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=cfg.unet_layers_per_block,
        block_out_channels=cfg.unet_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cfg.text_width, attention_head_dim=8, norm_num_groups=32,
    )


def build_text_encoder(cfg: TrainConfig, vocab_size: int, bos: int, eos: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_width, intermediate_size=cfg.text_width * 4,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=16,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, projection_dim=cfg.text_width,
    )
    return CLIPTextModel(config)


class _Checkpoints:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def save(self, name: str, state: dict) -> None:
        tmp = self.root / f"{name}.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.root / f"{name}.pt")  # whole or not at all

    def load(self, name: str) -> dict | None:
        path = self.root / f"{name}.pt"
        return torch.load(path, weights_only=False) if path.exists() else None


def edge_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, H, W): 1 + weight within 1 px of a colour change in x (B, 3, H, W)."""
    change = torch.zeros_like(x[:, :1])
    dy = (x[:, :, 1:] - x[:, :, :-1]).abs().sum(1, keepdim=True) > 1e-3
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().sum(1, keepdim=True) > 1e-3
    change[:, :, 1:] += dy
    change[:, :, :-1] += dy
    change[:, :, :, 1:] += dx
    change[:, :, :, :-1] += dx
    return 1.0 + weight * (F.max_pool2d(change, 3, 1, 1) > 0).float()


@torch.no_grad()
def held_out_psnr(vae: AutoencoderKL, n: int = 128) -> float:
    """Round-trip PSNR (encode mean, decode) on renders from the evaluation seeds, in dB."""
    rng = np.random.default_rng(EVAL_SEED_BASE + 1)
    x = _to_tensor(sample_batch(rng, n, all_combos())[0])
    was_training = vae.training
    vae.eval()
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    vae.train(was_training)
    return 10 * math.log10(4.0 / max(F.mse_loss(recon, x).item(), 1e-10))


def train_vae(cfg: TrainConfig, ck: _Checkpoints, log: Path | None = None) -> tuple[AutoencoderKL, int]:
    """The trained VAE, and the step it resumed from (vae_steps when a finished one was loaded)."""
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    state = ck.load("vae")
    start = 0
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        if state.get("done"):
            return vae.eval(), start
    rng = np.random.default_rng(cfg.seed + 1 + start)
    bar = tqdm(range(start, cfg.vae_steps), desc="vae", initial=start, total=cfg.vae_steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _cosine_lr(step, cfg.vae_steps, cfg.vae_warmup)
        x = _to_tensor(sample_batch(rng, cfg.vae_batch)[0])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        if cfg.vae_edge_weight:
            w = edge_weights(x, cfg.vae_edge_weight)
            w = w / w.mean()
            rec_loss = (w * (recon - x) ** 2).mean() + 0.5 * (w * (recon - x).abs()).mean()
        else:
            rec_loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = rec_loss + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            psnr = 10 * math.log10(4.0 / max(F.mse_loss(recon, x).item(), 1e-10))
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            ck.save("vae", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
            if log is not None:
                with log.open("a") as f:
                    f.write(json.dumps({"step": step + 1, "psnr": held_out_psnr(vae), "time": time.time()}) + "\n")
    ck.save("vae", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": cfg.vae_steps, "done": True})
    return vae.eval(), start


@torch.no_grad()
def encode_dataset(cfg: TrainConfig, vae: AutoencoderKL, ck: _Checkpoints) -> tuple[torch.Tensor, list[str], float]:
    state = ck.load("latents")
    if state is not None:
        return state["latents"], state["captions"], state["scaling_factor"]
    rng = np.random.default_rng(cfg.seed + 2)
    images, captions = sample_batch(rng, cfg.num_train_images)
    chunks = []
    for i in tqdm(range(0, len(images), 256), desc="encode"):
        chunks.append(vae.encode(_to_tensor(images[i : i + 256])).latent_dist.mean)
    latents = torch.cat(chunks)
    # SD convention: scale latents to unit variance.
    scaling_factor = float(1.0 / latents.std())
    ck.save("latents", {"latents": latents, "captions": captions, "scaling_factor": scaling_factor})
    return latents, captions, scaling_factor


def train_unet(cfg: TrainConfig, latents: torch.Tensor, captions: list[str], tokenizer, ck: _Checkpoints):
    noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    text_encoder = build_text_encoder(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    unet = build_unet(cfg, latents.shape[-1])
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    start = 0
    state = ck.load("unet")
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        start = state["step"]
    ids = tokenizer(
        [*captions, ""], padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    ).input_ids
    caption_ids, empty_ids = ids[:-1], ids[-1:]
    acp = noise_scheduler.alphas_cumprod
    snr = acp / (1 - acp)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    unet.train()
    text_encoder.train()
    bar = tqdm(range(start, cfg.unet_steps), desc="unet", initial=start, total=cfg.unet_steps)
    for step in bar:
        gen.manual_seed(cfg.seed + 3 + step)  # resumable: each step's randomness is its own
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * _cosine_lr(step, cfg.unet_steps, cfg.warmup_steps)
        idx = torch.randint(len(latents), (cfg.unet_batch,), generator=gen)
        x0 = latents[idx]
        tok = caption_ids[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
        tok[drop] = empty_ids
        noise, t, xt = noised(x0, gen, cfg.offset_noise, noise_scheduler)
        cond = text_encoder(tok)[0]
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        loss = min_snr_loss(pred, noise, snr, t, cfg.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, params, step, cfg.ema_decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            ck.save("unet", {
                "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                "opt": opt.state_dict(), "ema": ema, "step": step + 1,
            })
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return unet.eval(), text_encoder.eval(), start


def train(cfg: TrainConfig, out: Path, stage: str = "all") -> Path:
    """Train into ``out``; the model folder, or with stage="vae" the VAE's folder after the VAE stage."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    ck = _Checkpoints(out / "checkpoints")
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    started = time.time()
    tokenizer = build_clip_tokenizer(VOCABULARY, out / "tokenizer_build", model_max_length=16)
    vae, vae_start = train_vae(cfg, ck, out / "vae_log.jsonl")
    latents, captions, scaling = encode_dataset(cfg, vae, ck)
    vae.register_to_config(scaling_factor=scaling)
    # The finished VAE on its own (float32), so that it can be measured and a preview decoder distilled from it
    # while the UNet trains.
    vae.save_pretrained(out / "vae", safe_serialization=True)
    if stage == "vae":
        print(f"saved {out / 'vae'} after {(time.time() - started) / 60:.1f} min")
        return out / "vae"
    unet, text_encoder, unet_start = train_unet(cfg, latents * scaling, captions, tokenizer, ck)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = _DiffusersSD(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    model_dir = out / "model"
    pipe.save_pretrained(model_dir, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # keep the human-readable BPE files beside tokenizer.json
        shutil.copy(out / "tokenizer_build" / name, model_dir / "tokenizer" / name)
    # The tiny preview decoder, distilled from the float32 VAE (tools/distill_preview.py; resumable too).
    # Its targets include the x0 estimates of runs of the finished model (loaded as users load it, float32).
    distill_cfg = DistillConfig(seed=cfg.seed, threads=cfg.threads)
    model = stepdiff.AutoPipelineForText2Image.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.set_progress_bar_config(disable=True)
    distilled = distill(distill_cfg.smoke_version() if cfg.smoke else distill_cfg,
                        AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32), out, model)
    shutil.copytree(distilled, model_dir / PREVIEW_DECODER_DIR, dirs_exist_ok=True)
    shutil.copy(out / "preview_decoder.json", model_dir / PREVIEW_DECODER_DIR / "distill_report.json")
    elapsed = time.time() - started
    (out / "train_time.json").write_text(json.dumps({
        "wall_seconds_this_invocation": elapsed, "vae_resumed_from_step": vae_start, "unet_resumed_from_step": unet_start,
    }))
    print(f"saved {model_dir} after {elapsed / 60:.1f} min")
    return model_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the shipped shapes text-to-image model from scratch.")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, final model/)")
    parser.add_argument("--smoke", action="store_true", help="a few steps only, to check the script runs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    parser.add_argument("--stage", choices=STAGES, default="all", help="vae: stop after the VAE stage (default: all)")
    parser.add_argument("--recipe", choices=("v2", "v1"), default="v2", help="v2 (default) or the shapes-v1 settings")
    args = parser.parse_args(argv)
    cfg = TrainConfig() if args.recipe == "v2" else TrainConfig.v1()
    if args.smoke:
        cfg = cfg.smoke_version()
    if args.threads is not None:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    train(cfg, args.out, args.stage)


if __name__ == "__main__":
    main()
