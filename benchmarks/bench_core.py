"""Issue 2 benchmarks: stepdiff against diffusers on identical tiny-SDXL weights, in one process.

    python benchmarks/bench_core.py [--repeats 5] [--width 128] [--latent 64] [--only a,b,c] [--smoke]

The default configuration (UNet base width 128, 64x64 latents = 128x128 output) is compute-bound
enough on a 2-core CPU that one UNet row costs about half of two, as on a GPU; at 32x32 latents a
batch of one still costs ~55% of a batch of two, which lifts (c) by a few points.

(a) stepdiff / diffusers time for 25 steps, no callback (goal <= 1.00)
(b) overhead of a no-op callback that requests every tensor input (goal <= 2%)
(c) CFG cutoff at ratio 0.4 against full CFG (goal <= 0.75; theory 0.70 plus fixed costs)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import diffusers
import torch

import stepdiff
from _common import SMOKE, ModelClock, describe_paired, medians, table, time_rounds
from stepdiff.testing import make_tiny_sdxl

SHARED = "stepdiff on diffusers' modules"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=128, help="UNet base channels (large enough to dominate a step)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--latent", type=int, default=64, help="latent side (the output is twice as large)")
    parser.add_argument("--only", default="a,b,c", help="which measures to run, e.g. 'a' or 'a,c'")
    parser.add_argument("--smoke", action="store_true", help=SMOKE)
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.width, args.latent, args.steps = 1, 32, 8, 2
    torch.set_num_threads(1 if args.smoke else 2)
    diffusers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_sdxl(tmp, width=args.width, sample_size=args.latent)
        ours = stepdiff.StableDiffusionXLPipeline.from_pretrained(folder)
        theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in ours.unet.parameters()) / 1e6
    size = 2 * args.latent  # the tiny VAE downsamples by 2
    kwargs = dict(prompt="a red car on the road", num_inference_steps=args.steps, guidance_scale=6.0, output_type="np",
                  height=size, width=size)

    def noop(pipe, i, t, kw):
        return kw

    clocks = {id(p): ModelClock(p.unet) for p in (ours, theirs)}

    def run(pipe, **extra):
        def call():
            pipe(**kwargs, generator=torch.Generator().manual_seed(0), **extra)
        return clocks[id(pipe)].wrap(call) if id(pipe) in clocks and not extra else call

    every_ours = list(stepdiff.StableDiffusionXLPipeline._callback_tensor_inputs)
    every_theirs = list(diffusers.StableDiffusionXLPipeline._callback_tensor_inputs)
    only = set(args.only.split(","))
    contenders = {"diffusers": run(theirs), "stepdiff": run(ours)}
    if "a" in only:  # control: stepdiff's pipeline code driving diffusers' own module objects
        shared = stepdiff.StableDiffusionXLPipeline(**theirs.components)
        shared.set_progress_bar_config(disable=True)
        contenders[SHARED] = run(shared)
    if "b" in only:
        contenders["stepdiff+noop(all inputs)"] = run(
            ours, callback_on_step_end=noop, callback_on_step_end_tensor_inputs=every_ours)
        contenders["diffusers+noop(all inputs)"] = run(
            theirs, callback_on_step_end=noop, callback_on_step_end_tensor_inputs=every_theirs)
    if "c" in only:
        contenders["stepdiff+cutoff0.4"] = run(ours, callback_on_step_end=stepdiff.callbacks.CFGCutoffCallback(
            cutoff_step_ratio=0.4))
        contenders["diffusers+cutoff0.4"] = run(
            theirs, callback_on_step_end=diffusers.callbacks.SDXLCFGCutoffCallback(cutoff_step_ratio=0.4))
    rounds = time_rounds(contenders, repeats=args.repeats)
    t = medians(rounds)
    rows_cut = 2 * (int(args.steps * 0.4) + 1) + (args.steps - int(args.steps * 0.4) - 1)
    print(f"tiny SDXL, UNet {params:.1f}M params, {size}x{size} output ({args.latent}x{args.latent} latents), "
          f"{args.steps} steps, median of {args.repeats}, torch threads 2\n")
    print(table([(name, f"{sec:.3f}") for name, sec in t.items()], ("run", "median s")))
    print()
    out_ours, out_theirs = (clocks[id(p)].median_outside() for p in (ours, theirs))
    rows = [
        ("(a) stepdiff / diffusers, no callback", f"{t['stepdiff'] / t['diffusers']:.3f}", "<= 1.00"),
        ("    median of the per-round ratios", describe_paired(rounds, 'stepdiff', 'diffusers'), ""),
        ("    seconds outside the UNet per call, stepdiff / diffusers",
         f"{out_ours:.3f} / {out_theirs:.3f} = {out_ours / out_theirs:.2f}", ""),
    ]
    if "a" in only:
        rows.append(("    control: stepdiff on diffusers' own modules / diffusers",
                     f"{t[SHARED] / t['diffusers']:.3f} (per-round {describe_paired(rounds, SHARED, 'diffusers')})", ""))
    if "b" in only:
        rows += [
            ("(b) no-op callback, every tensor input: stepdiff overhead",
             f"{t['stepdiff+noop(all inputs)'] / t['stepdiff'] - 1:+.1%}", "<= 2%"),
            ("    same for diffusers", f"{t['diffusers+noop(all inputs)'] / t['diffusers'] - 1:+.1%}", ""),
        ]
    if "c" in only:
        rows += [
            ("(c) CFG cutoff 0.4 / full CFG, stepdiff", f"{t['stepdiff+cutoff0.4'] / t['stepdiff']:.3f}",
             f"<= 0.75 (rows {rows_cut}/{2 * args.steps} = {rows_cut / (2 * args.steps):.2f})"),
            ("    same for diffusers", f"{t['diffusers+cutoff0.4'] / t['diffusers']:.3f}", ""),
        ]
    print(table(rows, ("measure", "value", "goal")))

if __name__ == "__main__":
    main()
