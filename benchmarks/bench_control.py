"""The shipped ControlNet (issue 12), on the shipped model, 25 steps, float32:

    python benchmarks/bench_control.py                       # all three
    python benchmarks/bench_control.py --only quality        # (a) IoU and adherence, with and without control
    python benchmarks/bench_control.py --only speed          # (b) ControlNet call: stepdiff vs diffusers (+ noise floor)
    python benchmarks/bench_control.py --only rows           # (c) model rows saved by a CFG cutoff of 0.4
    python benchmarks/bench_control.py --only sdxl-inpaint   # (d) SDXL ControlNet inpainting: stepdiff vs diffusers
    python benchmarks/bench_control.py --smoke               # all four at the smallest settings: checks it runs

(a) Held-out prompts (combinations training never saw) with held-out silhouettes (positions and sizes drawn from
the evaluation seeds), judged from the pixels: the IoU of the generated shape (the largest region of the shape's
colour) with the control silhouette, and adherence (colour, shape, background, all three) beside the same prompts
and seeds without control; then the same with ``control_guidance_end=0.5`` and the time that saves.
(b) Interleaved rounds; the ratio of medians and the per-round ratio with its 95% bootstrap interval, beside
"diffusers again" (the noise floor; see benchmarks/README).
(c) Model rows and ControlNet rows of a run with ``CFGCutoffCallback(cutoff_step_ratio=0.4)`` against full CFG,
beside the expected ratio.
(d) Not on the shipped model (an SD model): a tiny SDXL (stepdiff.testing, 64 base channels, 32x32 latents) with
a tiny ControlNet, ``StableDiffusionXLControlNetInpaintPipeline`` against diffusers' on the same weights, 25 steps,
interleaved rounds as (b).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
import torch

import stepdiff
from _common import SMOKE, describe_paired, medians, table, time_rounds
from stepdiff.models import default_controlnet, default_model
from stepdiff.shapes.dataset import eval_pairs, random_sample, silhouette
from stepdiff.shapes.judge import judge, shape_mask

STEPS = 25


def held_out(n_per_combo: int, limit: int | None = None):
    """(prompt, control picture, silhouette mask, combo, seed) for held-out combos and held-out silhouettes."""
    items = []
    for combo, seed in eval_pairs(n_per_combo)[:limit]:
        sample = random_sample(np.random.default_rng(seed), combo)
        picture = silhouette(sample)
        items.append((sample.caption, picture, np.asarray(picture)[..., 0] > 127, combo, seed))
    return items


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _correct(image, combo) -> bool:
    v = judge(image)
    return (v.color, v.shape, v.background) == tuple(combo)


def quality(args, pipe, plain) -> None:
    items = held_out(args.seeds_per_combo, args.pairs)
    guidance = json.loads((default_model() / "stepdiff.json").read_text())["guidance_scale"]
    rows, results = [], {}
    for label, end in (("no control", None), ("control, end 1.0", 1.0), ("control, end 0.5", 0.5)):
        ious, correct, seconds = [], [], 0.0
        for i in range(0, len(items), args.batch):
            chunk = items[i : i + args.batch]
            prompts = [c[0] for c in chunk]
            generators = [torch.Generator().manual_seed(c[4]) for c in chunk]
            start = time.perf_counter()
            if end is None:
                out = plain(prompts, num_inference_steps=STEPS, guidance_scale=guidance, generator=generators)
            else:
                out = pipe(prompts, image=[c[1] for c in chunk], num_inference_steps=STEPS, guidance_scale=guidance,
                           generator=generators, control_guidance_end=end)
            seconds += time.perf_counter() - start
            for image, c in zip(out.images, chunk):
                ious.append(iou(shape_mask(image), c[2]))
                correct.append(_correct(image, c[3]))
        results[label] = {"iou": statistics.mean(ious), "adherence": 100 * statistics.mean(correct), "seconds": seconds}
        rows.append((label, f"{statistics.mean(ious):.3f}", f"{statistics.median(ious):.3f}",
                     f"{100 * statistics.mean(correct):.1f}%", f"{seconds / len(items):.3f}"))
    print(f"(a) {len(items)} held-out prompts with held-out silhouettes, guidance {guidance}, {STEPS} steps")
    print(table(rows, ("run", "mean IoU with the silhouette", "median IoU", "adherence (all three)", "s per image")))
    base = results["no control"]
    for label in ("control, end 1.0", "control, end 0.5"):
        r = results[label]
        print(f"{label}: adherence {r['adherence'] - base['adherence']:+.1f} points against no control; "
              f"time {r['seconds'] / results['control, end 1.0']['seconds']:.3f} of end 1.0")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def speed(args, folder, controlnet_folder) -> None:
    import diffusers

    prompt, picture = held_out(1)[0][:2]
    ours = stepdiff.StableDiffusionControlNetPipeline.from_pretrained(
        folder, controlnet=diffusers.ControlNetModel.from_pretrained(controlnet_folder, torch_dtype=torch.float32))
    theirs = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        folder, controlnet=diffusers.ControlNetModel.from_pretrained(controlnet_folder, torch_dtype=torch.float32),
        torch_dtype=torch.float32, safety_checker=None)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)

    def call(p):
        return lambda: p(prompt, image=picture, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))

    a = np.asarray(call(ours)().images[0], dtype=int)
    b = np.asarray(call(theirs)().images[0], dtype=int)
    print(f"(b) ControlNet call, {STEPS} steps, one image; largest pixel difference stepdiff vs diffusers: "
          f"{np.abs(a - b).max()}")
    _compare("ControlNet text-to-image", call(ours), call(theirs), args.repeats)


def _compare(run: str, ours, theirs, repeats: int) -> None:
    """Interleaved rounds of stepdiff, diffusers and diffusers again (the noise floor), printed as one table row."""
    rounds = time_rounds({"stepdiff": ours, "diffusers": theirs, "diffusers again": theirs}, repeats)
    m = medians(rounds)
    print(table([(run, f"{m['stepdiff']:.3f}", f"{m['diffusers']:.3f}",
                  f"{m['stepdiff'] / m['diffusers']:.3f}", describe_paired(rounds, "stepdiff", "diffusers"),
                  f"{m['diffusers again'] / m['diffusers']:.3f} / {describe_paired(rounds, 'diffusers again', 'diffusers')}")],
                ("run", "stepdiff s", "diffusers s", "ratio of medians", "per-round ratio",
                 "noise floor: diffusers again / diffusers")))


def sdxl_inpaint_speed(args) -> None:
    import tempfile

    import diffusers
    from PIL import Image

    from stepdiff.testing import make_tiny_controlnet, make_tiny_sdxl

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_sdxl(os.path.join(tmp, "sdxl"), width=64, sample_size=32)
        net = diffusers.ControlNetModel.from_pretrained(make_tiny_controlnet(os.path.join(tmp, "cn"), folder))
        ours = stepdiff.StableDiffusionXLControlNetInpaintPipeline.from_pretrained(folder, controlnet=net)
        theirs = diffusers.StableDiffusionXLControlNetInpaintPipeline.from_pretrained(folder, controlnet=net)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    size = 64  # the tiny VAE downsamples by 2
    image = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
    mask = Image.fromarray(np.where(np.arange(size)[None, :] >= size // 2, 255, 0).astype(np.uint8).repeat(size, 0))
    control = Image.fromarray((rng.random((size, size, 3)) > 0.5).astype(np.uint8) * 255)

    def call(p):
        return lambda: p("a red car on the road", image=image, mask_image=mask, control_image=control,
                         num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")

    a, b = call(ours)().images, call(theirs)().images
    print(f"(d) SDXL ControlNet inpainting, tiny SDXL, {STEPS} steps, one {size}x{size} image; largest difference stepdiff "
          f"vs diffusers: {np.abs(a - b).max():.2e}")
    _compare("SDXL ControlNet inpaint", call(ours), call(theirs), args.repeats)


def rows_saved(args, pipe) -> None:
    from stepdiff.callbacks import CFGCutoffCallback

    prompt, picture = held_out(1)[0][:2]
    calls = {"controlnet": 0, "rows": 0}

    def count(module, inputs, kwargs, output):
        calls["controlnet"] += 1
        calls["rows"] += kwargs["sample"].shape[0] if "sample" in kwargs else inputs[0].shape[0]

    hook = pipe.controlnet.register_forward_hook(count, with_kwargs=True)
    results = {}
    for label, callback in (("full CFG", None), ("CFG cutoff 0.4", CFGCutoffCallback(cutoff_step_ratio=0.4))):
        calls.update(controlnet=0, rows=0)
        out = pipe(prompt, image=picture, num_inference_steps=STEPS, callback_on_step_end=callback,
                   generator=torch.Generator().manual_seed(0))
        results[label] = (out.record.model_rows, calls["rows"])
    hook.remove()
    cutoff = int(0.4 * STEPS)  # the callback runs at the end of this step: guidance is off from the next one
    expected = (2 * (cutoff + 1) + (STEPS - cutoff - 1)) / (2 * STEPS)
    (full_unet, full_cn), (cut_unet, cut_cn) = results["full CFG"], results["CFG cutoff 0.4"]
    print(f"(c) {STEPS} steps, CFG cutoff 0.4 (guidance off from step {cutoff + 1}): expected rows ratio {expected:.3f}")
    print(table([("UNet rows", str(full_unet), str(cut_unet), f"{cut_unet / full_unet:.3f}"),
                 ("ControlNet rows", str(full_cn), str(cut_cn), f"{cut_cn / full_cn:.3f}")],
                ("", "full CFG", "cutoff 0.4", "ratio")))


def main() -> None:
    global STEPS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="quality,speed,rows",
                        help="comma-separated: quality, speed, rows, sdxl-inpaint")
    parser.add_argument("--model", default=None, help="base model folder (default: the shipped one)")
    parser.add_argument("--controlnet", default=None, help="ControlNet folder (default: the shipped one)")
    parser.add_argument("--seeds-per-combo", type=int, default=4, help="(a): silhouettes per held-out combination")
    parser.add_argument("--batch", type=int, default=24, help="(a): images per call")
    parser.add_argument("--repeats", type=int, default=21, help="(b): rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="(a): also write the figures here")
    parser.add_argument("--pairs", type=int, default=None, help="(a): only the first N held-out pairs")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--smoke", action="store_true", help=SMOKE)
    args = parser.parse_args()
    if args.smoke:
        args.only, args.seeds_per_combo, args.pairs, args.batch = "quality,speed,rows,sdxl-inpaint", 1, 2, 2
        args.repeats, args.threads, args.steps = 1, 1, 2
    STEPS = args.steps
    torch.set_num_threads(args.threads)
    folder = args.model or default_model()
    controlnet_folder = args.controlnet or default_controlnet()
    only = set(args.only.split(","))
    if "sdxl-inpaint" in only:
        sdxl_inpaint_speed(args)
        if only == {"sdxl-inpaint"}:
            return
    from diffusers import ControlNetModel

    pipe = stepdiff.StableDiffusionControlNetPipeline.from_pretrained(
        folder, controlnet=ControlNetModel.from_pretrained(controlnet_folder, torch_dtype=torch.float32))
    pipe.set_progress_bar_config(disable=True)
    if "quality" in only:
        plain = stepdiff.StableDiffusionPipeline.from_pretrained(folder)
        plain.set_progress_bar_config(disable=True)
        quality(args, pipe, plain)
    if "speed" in only:
        speed(args, folder, controlnet_folder)
    if "rows" in only:
        rows_saved(args, pipe)


if __name__ == "__main__":
    main()
