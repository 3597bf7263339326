"""Step caching and adaptive guidance (issue 22): what each compute policy saves and what it costs.

    python benchmarks/bench_fast.py                      # shipped, anchors, breaks (about 25 min on 2 cores)
    python benchmarks/bench_fast.py --only shipped       # (a) every policy on the shipped model
    python benchmarks/bench_fast.py --only anchors       # (b) the deepcache and tgate packages, same weights
    python benchmarks/bench_fast.py --only breaks        # (c) where the packages break and stepdiff does not
    python benchmarks/bench_fast.py --only real          # (d) SD 1.5- and SDXL-size UNets, random weights
    python benchmarks/bench_fast.py --smoke              # all four at the smallest settings: checks it runs

(a) The shipped model at the CLI's defaults (25 DDIM steps, guidance 7.5). For each policy and combination:
wall time against the default run (interleaved rounds of a 4-prompt batch, median per-round ratio), model compute
against the default run (FLOPs counted by torch's FlopCounterMode over one whole run: text encoder and denoiser),
adherence on the 216 held-out (prompt, seed) pairs judged from the pixels (the ``stepdiff eval-shapes`` judge),
and the PSNR of each image against the default run's image of the same pair (mean over the pairs). Writes the
Pareto plot (time vs adherence) and a picture sheet (default vs ``--fast``) to docs/images.
(b) The classic pipeline on the same weights: plain, with ``DeepCacheSDHelper`` (the ``deepcache`` package), with
``TgateSDLoader`` and with ``TgateSDDeepCacheLoader`` (the ``tgate`` package), beside stepdiff with the same
settings, in one interleaved run; adherence and PSNR of the packages on the same 216 pairs, and the largest pixel
difference between each package's images and stepdiff's.
(c) Each case run on the packages and on stepdiff: a batch of 2 without CFG, two threads sharing a pipeline,
a ControlNet pipeline; the largest difference from the image each prompt gets alone (or the error).
(d) Real configs (SD 1.5: 860M parameters; SDXL: 2.6B) with random weights and tiny text encoders and VAE, at
64x64 latents, ``--real-steps`` steps (the policies' step patterns scaled to that count). Only the step-indexed
policies: with random weights the adaptive ones (first-block cache, adaptive guidance) decide on noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode

import stepdiff
from _common import SMOKE, describe_paired, paired_ratio, ratio_interval, smoke_config, table, time_rounds
from stepdiff.caching import AdaptiveGuidanceCallback as Adaptive
from stepdiff.caching import DeepCacheCallback as DeepCache
from stepdiff.caching import FirstBlockCacheCallback as FirstBlock
from stepdiff.caching import TGateCallback as TGate
from stepdiff.caching import fast_preset
from stepdiff.callbacks import CFGCutoffCallback, GuidanceIntervalCallback
from stepdiff.models import default_controlnet, default_model
from stepdiff.shapes.dataset import caption, eval_pairs
from stepdiff.shapes.judge import judge

STEPS = 25
GUIDANCE = 7.5
ROOT = Path(__file__).resolve().parent.parent


def cut(ratio: float) -> CFGCutoffCallback:
    return CFGCutoffCallback(cutoff_step_ratio=ratio)


# name -> callbacks for a run of `steps` steps
SETTINGS = {
    "default": lambda n: None,
    "CFG cutoff 0.4": lambda n: [cut(0.4)],
    "guidance interval [0.1, 0.5)": lambda n: [GuidanceIntervalCallback(start_ratio=0.1, end_ratio=0.5)],
    "DeepCache 3/0": lambda n: [DeepCache(3, 0)],
    "DeepCache 3/1": lambda n: [DeepCache(3, 1)],
    "DeepCache 5/0": lambda n: [DeepCache(5, 0)],
    "T-GATE 10": lambda n: [TGate(10)],
    "first-block 0.1": lambda n: [FirstBlock(0.1)],
    "first-block 0.2": lambda n: [FirstBlock(0.2)],
    "adaptive 0.999": lambda n: [Adaptive(0.999)],
    "DeepCache 3/0 + cutoff 0.4": lambda n: [cut(0.4), DeepCache(3, 0)],
    "DeepCache 3/0 + interval [0.1, 0.5)": lambda n: [GuidanceIntervalCallback(start_ratio=0.1, end_ratio=0.5),
                                                      DeepCache(3, 0)],
    "DeepCache 3/1 + T-GATE 10": lambda n: [TGate(10), DeepCache(3, 1)],
    "first-block 0.2 + cutoff 0.4": lambda n: [cut(0.4), FirstBlock(0.2)],
    "adaptive 0.999 + DeepCache 3/0": lambda n: [Adaptive(0.999), DeepCache(3, 0)],
    "T-GATE 10 + DeepCache 3/0": lambda n: [TGate(10), DeepCache(3, 0)],
    "T-GATE 10 (no self-attention reuse) + DeepCache 3/0": lambda n: [TGate(10, sp_interval=1, warm_up=0),
                                                                       DeepCache(3, 0)],
    "DeepCache 4/0 + cutoff 0.4": lambda n: [cut(0.4), DeepCache(4, 0)],
    "--fast (DeepCache 3/0 + cutoff 0.3)": fast_preset,
}


def load(folder=None):
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(folder or default_model())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, pairs, make, batch: int) -> tuple[np.ndarray, int]:
    images, rows = [], 0
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        out = pipe([caption(*c) for c, _ in chunk], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   generator=[torch.Generator().manual_seed(s) for _, s in chunk], output_type="np",
                   callback_on_step_end=make(STEPS))
        images.append(out.images)
        rows += out.record.model_rows
    return np.concatenate(images), rows


def adherence(images: np.ndarray, pairs) -> float:
    ok = 0
    for ((color, shape, background), _), image in zip(pairs, images):
        v = judge((image * 255).round().astype(np.uint8))
        ok += (v.background, v.color, v.shape) == (background, color, shape)
    return ok / len(pairs)


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    mse = ((images - reference) ** 2).reshape(len(images), -1).mean(1)
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def flops(pipe, make) -> int:
    with FlopCounterMode(display=False) as counter:
        pipe(caption("red", "circle", "blue"), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
             generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=make(STEPS))
    return counter.get_total_flops()


def timed_batch(pipe, make):
    prompts = [caption(*c) for c, _ in eval_pairs(1)[:4]]

    def run():
        pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
             generator=[torch.Generator().manual_seed(k) for k in range(len(prompts))], callback_on_step_end=make(STEPS))

    return run


def shipped(args) -> dict:
    pipe = load()
    pairs = eval_pairs(args.seeds_per_combo)[: args.pairs]
    results: dict[str, dict] = {}
    reference = None
    settings = {k: v for k, v in SETTINGS.items() if k == "default" or not args.settings or k in args.settings}
    known = dict(args.quality.get("shipped", {}))
    if any(name not in known for name in settings):
        known.pop("default", None)  # the images of the settings measured now are compared with a fresh default run
    for name, make in settings.items():
        if name in known:  # adherence, PSNR and rows of an earlier run (--quality-from): only time again
            results[name] = {**known[name], "flops": flops(pipe, make)}
            continue
        images, rows = generate(pipe, pairs, make, args.batch)
        if reference is None:
            reference = images
        results[name] = {"adherence": adherence(images, pairs), "psnr": psnr(images, reference),
                         "model_rows": rows, "flops": flops(pipe, make)}
        print(f"  {name}: adherence {results[name]['adherence']:.1%}", flush=True)
        if name.startswith("--fast"):
            picture_sheet(pairs, reference, images, args.figures / "fast_pictures.png")
    rounds = time_rounds({name: timed_batch(pipe, make) for name, make in settings.items()}, args.repeats,
                         warmup=0 if args.smoke else 1)
    base_flops = results["default"]["flops"]
    rows = []
    for name, r in results.items():
        r["time_ratio"] = paired_ratio(rounds, "default", name)  # > 1: faster than the default
        low, high = ratio_interval(rounds, "default", name)
        r["time_interval"] = [low, high]
        r["compute_ratio"] = base_flops / r["flops"]
        r["seconds"] = statistics.median(rounds[name])
        rows.append((name, f"{r['time_ratio']:.2f}x ({low:.2f}-{high:.2f})", f"{r['compute_ratio']:.2f}x",
                     f"{r['adherence']:.1%}",
                     "-" if name == "default" else f"{r['psnr']:.1f} dB", str(r["model_rows"])))
    print(f"\n(a) shipped model, {len(pairs)} held-out pairs, {STEPS} DDIM steps, guidance {GUIDANCE}; time: "
          f"{args.repeats} interleaved rounds of a 4-prompt batch\n")
    print(table(rows, ("setting", "speed-up (wall, 95% interval)", "less compute (FLOPs)", "adherence", "PSNR vs default",
                       "model rows")))
    pareto_plot(results, args.figures / "fast_pareto.png", len(pairs))
    return results


def picture_sheet(pairs, reference: np.ndarray, fast: np.ndarray, out: Path, count: int = 8) -> None:
    """Top row: the default run; bottom row: --fast; the same (prompt, seed) in each column."""
    picks = np.linspace(0, len(pairs) - 1, count).astype(int)
    h, w = reference.shape[1:3]
    sheet = Image.new("RGB", (count * (w + 4), 2 * (h + 4) + 28), "white")
    for col, k in enumerate(picks):
        for row, images in enumerate((reference, fast)):
            sheet.paste(Image.fromarray((images[k] * 255).round().astype(np.uint8)), (col * (w + 4), 28 + row * (h + 4)))
    ImageDraw.Draw(sheet).text((4, 8), "top: default (25 DDIM steps, guidance 7.5); bottom: --fast", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def pareto_plot(results: dict[str, dict], out: Path, pairs: int = 216) -> None:
    """Speed-up (x) against adherence (y), one numbered dot per setting (legend on the right); the Pareto front
    (no other setting both faster and more adherent) in red, joined by a line."""
    size, pad, legend = (980, 460), 60, 330
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [r["time_ratio"] for r in results.values()]
    ys = [r["adherence"] for r in results.values()]
    x0, x1 = 0.8, max(xs) * 1.08
    y0, y1 = min(ys) - 0.02, 1.01
    right = size[0] - legend

    def at(x, y):
        return (pad + (x - x0) / (x1 - x0) * (right - 2 * pad), size[1] - pad - (y - y0) / (y1 - y0) * (size[1] - 2 * pad))

    d.rectangle([pad, pad, right - pad, size[1] - pad], outline="black")
    for k in range(1, int(x1) + 1):
        d.text((at(k, y0)[0] - 6, size[1] - pad + 6), f"{k}x", fill="black")
    for frac in np.linspace(y0, 1.0, 5):
        d.text((8, at(x0, frac)[1] - 6), f"{frac:.0%}", fill="black")
    d.text((pad + 60, size[1] - 24), "speed-up against the default run (wall clock)", fill="black")
    d.text((pad, 20), f"adherence on {pairs} held-out pairs (shipped model, 25 DDIM steps, guidance 7.5)", fill="black")
    front, best = [], -1.0
    for name, r in sorted(results.items(), key=lambda kv: (-kv[1]["time_ratio"], -kv[1]["adherence"])):
        if r["adherence"] > best:
            front.append(name)
            best = r["adherence"]
    coords = sorted(at(results[n]["time_ratio"], results[n]["adherence"]) for n in front)
    if len(coords) > 1:
        d.line(coords, fill=(200, 60, 60), width=2)
    for k, (name, r) in enumerate(results.items(), start=1):
        x, y = at(r["time_ratio"], r["adherence"])
        colour = (200, 60, 60) if name in front else (60, 60, 200)
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        d.text((x + 5, y - 14 if k % 2 else y + 2), str(k), fill=colour)
        d.text((right + 4, pad + (k - 1) * 20), f"{k:>2}  {name}", fill=colour)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


# ------------------------------------------------------------------ (b) anchors


def classic_pipe(folder=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder or default_model(), safety_checker=None,
                                                   requires_safety_checker=False, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def anchor_calls(gate: int = 10):
    """name -> (fn(prompts, generators) -> images); the packages on the classic pipeline, stepdiff beside them."""
    from DeepCache import DeepCacheSDHelper
    from tgate import TgateSDDeepCacheLoader, TgateSDLoader

    plain = classic_pipe()
    deep = classic_pipe()
    helper = DeepCacheSDHelper(pipe=deep)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    tg = TgateSDLoader(classic_pipe())
    tgd = TgateSDDeepCacheLoader(classic_pipe(), cache_interval=3, cache_branch_id=0)
    ours = load()

    def classic(pipe, method="__call__", **extra):
        return lambda p, g: getattr(pipe, method)(p, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=g,
                                                  output_type="np", **extra).images

    def stepdiff_(make):
        return lambda p, g: ours(p, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=g, output_type="np",
                                 callback_on_step_end=make()).images

    return {
        "classic": classic(plain),
        "deepcache 3/0 (package)": classic(deep),
        "tgate 10 (package)": classic(tg, "tgate", gate_step=gate),
        "tgate 10 + deepcache 3/0 (package)": classic(tgd, "tgate", gate_step=gate),
        "stepdiff default": stepdiff_(lambda: None),
        "stepdiff DeepCache 3/0": stepdiff_(lambda: [DeepCache(3, 0)]),
        "stepdiff T-GATE 10": stepdiff_(lambda: [TGate(gate)]),
        "stepdiff T-GATE 10 + DeepCache 3/0": stepdiff_(lambda: [TGate(gate), DeepCache(3, 0)]),
        "stepdiff --fast": stepdiff_(lambda: fast_preset(STEPS)),
    }


PAIRS_OF = {"deepcache 3/0 (package)": "stepdiff DeepCache 3/0", "tgate 10 (package)": "stepdiff T-GATE 10",
            "tgate 10 + deepcache 3/0 (package)": "stepdiff T-GATE 10 + DeepCache 3/0", "classic": "stepdiff default"}


def anchors(args) -> dict:
    calls = anchor_calls()
    pairs = eval_pairs(args.seeds_per_combo)[: args.pairs]
    images = {}
    known = args.quality.get("anchors", {})
    for name, fn in calls.items():
        if known:
            continue
        parts = []
        for start in range(0, len(pairs), args.batch):
            chunk = pairs[start : start + args.batch]
            parts.append(fn([caption(*c) for c, _ in chunk], [torch.Generator().manual_seed(s) for _, s in chunk]))
        images[name] = np.concatenate(parts)
        print(f"  {name}: done", flush=True)
    prompts = [caption(*c) for c, _ in eval_pairs(1)[:4]]
    rounds = time_rounds({name: (lambda fn=fn: fn(prompts, [torch.Generator().manual_seed(k) for k in range(4)]))
                          for name, fn in calls.items()}, args.repeats, warmup=0 if args.smoke else 1)
    results, rows = {}, []
    for name in calls:
        base = "classic" if name in PAIRS_OF else "stepdiff default"
        twin = PAIRS_OF.get(name)
        r = results[name] = {"time_ratio": paired_ratio(rounds, base, name), **(known.get(name) or {
            "adherence": adherence(images[name], pairs), "psnr": psnr(images[name], images[base]),
            "max_diff_to_stepdiff": None if twin is None else float(np.abs(images[name] - images[twin]).max()),
        })}
        rows.append((name, f"{r['time_ratio']:.2f}x vs {base}", f"{r['adherence']:.1%}",
                     "-" if name == base else f"{r['psnr']:.1f} dB",
                     "-" if twin is None else f"{r['max_diff_to_stepdiff']:.2g}"))
    print(f"\n(b) anchors on the shipped model's weights, {len(pairs)} pairs; time: {args.repeats} interleaved rounds\n")
    print(table(rows, ("run", "speed-up (wall)", "adherence", "PSNR vs its plain run",
                       "largest difference, package vs stepdiff")))
    print("\nstepdiff T-GATE 10 + DeepCache 3/0 / tgate+deepcache package, per round:",
          describe_paired(rounds, "stepdiff T-GATE 10 + DeepCache 3/0", "tgate 10 + deepcache 3/0 (package)"))
    print("stepdiff --fast / tgate+deepcache package, per round:",
          describe_paired(rounds, "stepdiff --fast", "tgate 10 + deepcache 3/0 (package)"))
    print("stepdiff DeepCache 3/0 / deepcache package, per round:",
          describe_paired(rounds, "stepdiff DeepCache 3/0", "deepcache 3/0 (package)"))
    print("stepdiff T-GATE 10 / tgate package, per round:", describe_paired(rounds, "stepdiff T-GATE 10", "tgate 10 (package)"))
    print("stepdiff default vs classic, per round:", describe_paired(rounds, "stepdiff default", "classic"))
    return results


# ------------------------------------------------------------------ (c) where the packages break


def _alone_vs_batch(fn, prompts) -> float:
    batch = fn(prompts, [torch.Generator().manual_seed(k) for k in range(len(prompts))])
    alone = [fn([p], [torch.Generator().manual_seed(k)])[0] for k, p in enumerate(prompts)]
    return float(max(np.abs(batch[k] - alone[k]).max() for k in range(len(prompts))))


def breaks(args) -> dict:
    from DeepCache import DeepCacheSDHelper
    from tgate import TgateSDLoader

    prompts = [caption("red", "circle", "blue"), caption("yellow", "square", "purple")]
    found: dict[str, str] = {}

    def attempt(name, fn):
        try:
            found[name] = fn()
        except Exception as e:  # what breaks is the finding
            found[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        print(f"  {name}: {found[name]}", flush=True)

    tg = TgateSDLoader(classic_pipe())
    ours = load()
    def tgate_package(p, g):
        return tg.tgate(p, num_inference_steps=STEPS, guidance_scale=1.0, gate_step=10, generator=g,
                        output_type="np").images

    def tgate_ours(p, g):
        return ours(p, num_inference_steps=STEPS, guidance_scale=1.0, generator=g, output_type="np",
                    callback_on_step_end=[TGate(10)]).images

    attempt("tgate package, batch 2, guidance 1 (no CFG): largest difference, batch vs alone",
            lambda: f"{_alone_vs_batch(tgate_package, prompts):.3g}")
    attempt("stepdiff T-GATE, batch 2, guidance 1: largest difference, batch vs alone",
            lambda: f"{_alone_vs_batch(tgate_ours, prompts):.3g}")

    deep = classic_pipe()
    helper = DeepCacheSDHelper(pipe=deep)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()

    def threads(fn) -> str:
        alone = [fn([p], [torch.Generator().manual_seed(k)])[0] for k, p in enumerate(prompts)]
        got: dict[int, np.ndarray] = {}
        barrier = threading.Barrier(2)

        def work(k):
            barrier.wait()
            got[k] = fn([prompts[k]], [torch.Generator().manual_seed(k)])[0]

        ts = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return f"{max(np.abs(got[k] - alone[k]).max() for k in range(2)):.3g}"

    attempt("deepcache package, 2 threads on one pipeline: largest difference, thread vs alone", lambda: threads(
        lambda p, g: deep(p, num_inference_steps=STEPS, generator=g, output_type="np").images))
    attempt("stepdiff DeepCache, 2 threads on one pipeline: largest difference, thread vs alone", lambda: threads(
        lambda p, g: ours(p, num_inference_steps=STEPS, generator=g, output_type="np",
                          callback_on_step_end=[DeepCache(3, 0)]).images))
    helper.disable()

    from diffusers import ControlNetModel
    from diffusers import StableDiffusionControlNetPipeline as ClassicControl

    net = ControlNetModel.from_pretrained(default_controlnet())
    side = 64 if args.smoke else 128
    control = Image.new("RGB", (side, side), "black")
    ImageDraw.Draw(control).ellipse([side // 4, side // 4, 3 * side // 4, 3 * side // 4], fill="white")
    cc = ClassicControl.from_pretrained(default_model(), controlnet=net, safety_checker=None,
                                        requires_safety_checker=False, torch_dtype=torch.float32)
    cc.set_progress_bar_config(disable=True)
    plain_c = cc(prompts[0], image=control, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    helper = DeepCacheSDHelper(pipe=cc)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    def deepcache_control():
        cached = cc(prompts[0], image=control, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="np").images
        return f"{psnr(cached, plain_c):.1f} dB (the ControlNet still runs every step)"

    attempt("deepcache package on the ControlNet pipeline: PSNR vs its plain run", deepcache_control)
    helper.disable()
    sc = stepdiff.StableDiffusionControlNetPipeline.from_pretrained(default_model(), controlnet=net)
    sc.set_progress_bar_config(disable=True)
    for mode in ("reuse", "run"):
        attempt(f"stepdiff DeepCache on the ControlNet pipeline, controlnet={mode!r}: PSNR vs plain, speed-up",
                lambda mode=mode: _control_case(sc, prompts[0], control, mode, args.repeats))
    print("\n(c) where the packages break\n")
    print(table([(k, v) for k, v in found.items()], ("case", "result")))
    return found


def _control_case(pipe, prompt, control, mode, repeats: int = 7) -> str:
    def call(cbs):
        return lambda: pipe(prompt, image=control, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                            output_type="np", callback_on_step_end=cbs()).images

    plain, cached = call(lambda: None), call(lambda: [DeepCache(3, 0, controlnet=mode)])
    rounds = time_rounds({"plain": plain, "cached": cached}, repeats)
    return f"{psnr(cached(), plain()):.1f} dB, {paired_ratio(rounds, 'plain', 'cached'):.2f}x"


# ------------------------------------------------------------------ (d) real sizes

SD15_UNET = dict(
    sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def real_pipe(family: str, folder: Path, smoke: bool = False):
    """A pipeline folder with the real UNet config (random weights) and tiny text encoders and VAE whose widths fit
    it: make the tiny model of the family, then swap in the full-size UNet (``smoke``: the same layout, narrow)."""
    from diffusers import UNet2DConditionModel

    from stepdiff.testing import make_tiny_sd, make_tiny_sdxl

    if family == "sd15":
        make_tiny_sd(folder)
        config, cls = SD15_UNET, stepdiff.StableDiffusionPipeline
    else:
        make_tiny_sdxl(folder)
        config, cls = SDXL_UNET, stepdiff.StableDiffusionXLPipeline
    pipe = cls.from_pretrained(folder)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(**(smoke_config(config) if smoke else config)).eval()
    pipe.set_progress_bar_config(disable=True)
    _fit_text_width(pipe, family)
    return pipe


def _fit_text_width(pipe, family: str) -> None:
    """The tiny encoders are narrower than a real UNet's cross-attention: project their output with a fixed random
    matrix (a stand-in encoder: its values do not matter for timing, only the width)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def widen(encoder, width, with_projection=False):
        cfg = encoder.config.to_dict()
        cfg.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4, projection_dim=1280)
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(CLIPTextConfig(**cfg))
        return model.eval()

    if family == "sd15":
        pipe.text_encoder = widen(pipe.text_encoder, 768)
    else:
        pipe.text_encoder = widen(pipe.text_encoder, 768)
        pipe.text_encoder_2 = widen(pipe.text_encoder_2, 1280, with_projection=True)


def real(args) -> dict:
    n = args.real_steps
    settings = {
        "default": lambda: None,
        "CFG cutoff 0.4": lambda: [cut(0.4)],
        "DeepCache 3/0": lambda: [DeepCache(3, 0)],
        f"T-GATE {round(0.4 * n)}": lambda: [TGate(max(1, round(0.4 * n)))],
        "--fast": lambda: fast_preset(n),
    }
    results = {}
    for family in args.real_families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            pipe = real_pipe(family, Path(tmp) / family, args.smoke)
            size = (8 if args.smoke else 64) * pipe.vae_scale_factor  # 64x64 latents

            def call(make, pipe=pipe, size=size):
                return lambda: pipe("a cat", height=size, width=size, num_inference_steps=n, guidance_scale=GUIDANCE,
                                    generator=torch.Generator().manual_seed(0), output_type="latent",
                                    callback_on_step_end=make())

            rounds = time_rounds({k: call(v) for k, v in settings.items()}, args.real_repeats, warmup=0)
            results[family] = {k: paired_ratio(rounds, "default", k) for k in settings}
            results[family]["default_seconds"] = statistics.median(rounds["default"])
            del pipe
        print(f"  {family}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[family].items()), flush=True)
    rows = [(k, *(f"{results[f][k]:.2f}x" for f in results)) for k in settings]
    print(f"\n(d) real-size UNets, random weights, 64x64 latents, {n} steps, {args.real_repeats} interleaved rounds "
          "(speed-up against the default run)\n")
    print(table(rows, ("setting", *results)))
    return results


def main() -> None:
    global STEPS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None,
                        help="comma-separated: shipped, anchors, breaks, real (default: the first three; --smoke: all)")
    parser.add_argument("--seeds-per-combo", type=int, default=9, help="(a, b): 9 gives the 216 held-out pairs")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=7, help="(a, b): timing rounds")
    parser.add_argument("--settings", type=lambda v: v.split(";"), default=None,
                        help="(a): only these settings (names as in the table, ';'-separated) beside the default")
    parser.add_argument("--real-steps", type=int, default=6)
    parser.add_argument("--real-repeats", type=int, default=2)
    parser.add_argument("--real-families", default="sd15,sdxl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write every figure here")
    parser.add_argument("--pairs", type=int, default=None, help="(a, b): only the first N held-out pairs")
    parser.add_argument("--steps", type=int, default=STEPS, help="(a, b, c): steps per image")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs/images",
                        help="(a): where the Pareto plot and the picture sheet go")
    parser.add_argument("--smoke", action="store_true", help=SMOKE)
    parser.add_argument("--quality-from", default=None, metavar="JSON",
                        help="(a, b): take adherence, PSNR and rows from this earlier --json and only measure time and "
                             "FLOPs again (time on an idle machine after a long quality run)")
    args = parser.parse_args()
    if args.smoke:
        args.only = args.only or "shipped,anchors,breaks,real"
        args.seeds_per_combo, args.pairs, args.batch, args.repeats = 1, 2, 2, 1
        args.settings, args.steps, args.real_steps, args.real_repeats = ["--fast (DeepCache 3/0 + cutoff 0.3)"], 3, 2, 1
        figures = tempfile.TemporaryDirectory(prefix="bench-fast-")  # removed when the run ends
        args.threads, args.figures = 1, Path(figures.name)
    STEPS = args.steps
    args.only = args.only or "shipped,anchors,breaks"
    args.quality = json.loads(Path(args.quality_from).read_text()) if args.quality_from else {}
    torch.set_num_threads(args.threads)
    out = {}
    for part in args.only.split(","):
        print(f"== {part}", flush=True)
        out[part] = {"shipped": shipped, "anchors": anchors, "breaks": breaks, "real": real}[part](args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
