"""Issue 6 benchmarks: guidance schedules save what they promise, and SD3 against diffusers.

    python benchmarks/bench_guidance.py [--repeats 5] [--smoke]

(1) On a tiny SDXL whose UNet dominates a step: time of CFG cutoff 0.4, guidance interval [0.2, 0.8)
    and a linear ramp 7.5 -> 0, each against full CFG, beside the ratio of model rows computed
    (goal: the time ratio tracks the rows ratio within 10%).
(2) SD3: stepdiff / diffusers time for 25 steps on identical tiny weights (goal <= 1.00).
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
from _common import SMOKE, TINY_SD3, TINY_SD3_SMOKE, ModelClock, describe_paired, medians, table, time_interleaved, time_rounds
from stepdiff.callbacks import CFGCutoffCallback, GuidanceIntervalCallback, GuidanceScheduleCallback, linear_ramp
from stepdiff.testing import make_tiny_sd3, make_tiny_sdxl


def schedules(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pipe = stepdiff.StableDiffusionXLPipeline.from_pretrained(make_tiny_sdxl(tmp, width=args.width, sample_size=32))
    pipe.set_progress_bar_config(disable=True)
    settings = {
        "full CFG": None,
        "CFG cutoff 0.4": CFGCutoffCallback(cutoff_step_ratio=0.4),
        "interval [0.2, 0.8)": GuidanceIntervalCallback(start_ratio=0.2, end_ratio=0.8),
        "linear ramp 7.5 -> 0": GuidanceScheduleCallback(linear_ramp(7.5, 0.0)),
    }
    rows = {}

    def run(name, cb):
        def go():
            out = pipe("a red car on the road", num_inference_steps=args.steps, guidance_scale=7.5,
                       generator=torch.Generator().manual_seed(0), callback_on_step_end=cb, output_type="latent")
            rows[name] = out.record.model_rows

        return go

    t = time_interleaved({name: run(name, cb) for name, cb in settings.items()}, repeats=args.repeats)
    out = []
    for name in settings:
        time_ratio, rows_ratio = t[name] / t["full CFG"], rows[name] / rows["full CFG"]
        out.append((name, f"{t[name]:.3f}", f"{rows[name]}", f"{time_ratio:.3f}", f"{rows_ratio:.3f}",
                    f"{time_ratio / rows_ratio - 1:+.1%}"))
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(f"tiny SDXL, UNet {params:.1f}M, {args.steps} steps, guidance 7.5, latent output, median of {args.repeats}\n")
    print(table(out, ("schedule", "median s", "model rows", "time / full", "rows / full", "time vs rows")))


def sd3(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_sd3(tmp, **args.sd3)
        ours = stepdiff.StableDiffusion3Pipeline.from_pretrained(folder)
        theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(folder)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)

    clocks = {id(p): ModelClock(p.transformer) for p in (ours, theirs)}

    def run(p):
        return clocks[id(p)].wrap(lambda: p("a red car", num_inference_steps=args.steps, guidance_scale=7.0,
                                            generator=torch.Generator().manual_seed(0), output_type="np"))

    # The same diffusers pipeline again as a third contender: the noise floor of this run.
    rounds = time_rounds({"diffusers": run(theirs), "stepdiff": run(ours), "diffusers again": run(theirs)},
                         repeats=args.repeats)
    t = medians(rounds)
    out_ours, out_theirs = (clocks[id(p)].median_outside() for p in (ours, theirs))
    params = sum(p.numel() for p in ours.transformer.parameters()) / 1e6
    print(f"\ntiny SD3 (transformer {params:.1f}M, with T5), {args.steps} steps, guidance 7.0, median of {args.repeats}\n")
    print(table([(k, f"{v:.3f}") for k, v in t.items()] + [
        ("stepdiff / diffusers", f"{t['stepdiff'] / t['diffusers']:.3f}"),
        ("median of the per-round ratios", describe_paired(rounds, 'stepdiff', 'diffusers')),
        ("noise floor: diffusers again / diffusers", f"{t['diffusers again'] / t['diffusers']:.3f}"),
        ("    median of the per-round ratios", describe_paired(rounds, 'diffusers again', 'diffusers')),
        ("seconds outside the transformer, stepdiff / diffusers",
         f"{out_ours:.3f} / {out_theirs:.3f} = {out_ours / out_theirs:.2f}"),
    ], ("run", "median s")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--only", choices=("schedules", "sd3"), default=None, help="run one part only")
    parser.add_argument("--smoke", action="store_true", help=SMOKE)
    args = parser.parse_args()
    args.width, args.sd3 = 128, TINY_SD3
    if args.smoke:
        args.repeats, args.steps, args.width, args.sd3 = 1, 2, 32, TINY_SD3_SMOKE
    torch.set_num_threads(1 if args.smoke else 2)
    diffusers.utils.logging.disable_progress_bar()
    if args.only != "sd3":
        schedules(args)
    if args.only != "schedules":
        sd3(args)


if __name__ == "__main__":
    main()
