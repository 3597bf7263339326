"""Runs on the engine (issue 11), on the shipped model, 25 steps, float32:

    python benchmarks/bench_runs.py                 # all three
    python benchmarks/bench_runs.py --only image    # (a) img2img and inpainting: stepdiff vs diffusers (+ noise floor)
    python benchmarks/bench_runs.py --only steps    # (b) the step iterator (pipe.steps) vs __call__
    python benchmarks/bench_runs.py --only threads  # (c) two threads on one pipeline vs two pipeline objects
    python benchmarks/bench_runs.py --only finite   # (d) the default NaN/inf check: on vs off

(a) and (b) interleave their contenders and report the ratio of medians and the per-round ratio with
its 95% bootstrap interval (see benchmarks/README). (c) runs 2 x N images with two threads, once
sharing one pipeline object and once with one object per thread, checks the images are identical to
single-threaded runs, and reports images per second for each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import diffusers
import numpy as np
import torch

import stepdiff
from _common import SMOKE, ModelClock, describe_paired, medians, table, time_rounds
from stepdiff.shapes.dataset import Sample, render

PROMPT = "a green square on a yellow background"


def _inputs():
    image = render(Sample("red", "circle", "blue", 32, 32, 18))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[12:52, 12:52] = 255
    from PIL import Image

    return image, Image.fromarray(mask)


def _load(ours_cls, theirs_cls, folder):
    ours = ours_cls.from_pretrained(folder)
    theirs = theirs_cls.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


def image_pipelines(args, folder) -> None:
    image, mask = _inputs()
    kinds = [
        ("img2img, strength 0.6", stepdiff.StableDiffusionImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline,
         dict(image=image, strength=0.6)),
        ("inpainting", stepdiff.StableDiffusionInpaintPipeline, diffusers.StableDiffusionInpaintPipeline,
         dict(image=image, mask_image=mask)),
    ]
    rows = []
    for label, ours_cls, theirs_cls, extra in kinds:
        ours, theirs = _load(ours_cls, theirs_cls, folder)
        clocks = {id(p): ModelClock(p.unet) for p in (ours, theirs)}  # the pipeline's own time: outside the UNet

        def call(p, extra=extra, clocks=clocks):
            return clocks[id(p)].wrap(
                lambda: p(PROMPT, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), **extra))

        rounds = time_rounds(
            {"stepdiff": call(ours), "diffusers": call(theirs), "diffusers again": call(theirs)}, args.repeats
        )
        m = medians(rounds)
        out_ours, out_theirs = (1e3 * clocks[id(p)].median_outside() for p in (ours, theirs))
        rows.append((label, f"{m['stepdiff']:.3f}", f"{m['diffusers']:.3f}", f"{m['stepdiff'] / m['diffusers']:.3f}",
                     describe_paired(rounds, "stepdiff", "diffusers"),
                     f"{m['diffusers again'] / m['diffusers']:.3f} / {describe_paired(rounds, 'diffusers again', 'diffusers')}",
                     f"{out_ours:.1f} / {out_theirs:.1f}"))
    print(table(rows, ("run", "stepdiff s", "diffusers s", "ratio of medians", "per-round ratio",
                       "noise floor: diffusers again / diffusers", "ms outside the UNet per call, stepdiff / diffusers")))


def step_iterator(args, folder) -> None:
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def call():
        return pipe(PROMPT, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))

    def steps():
        run = pipe.steps(PROMPT, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))
        for _ in run:
            pass
        return run.finish()

    assert np.array_equal(np.asarray(call().images[0]), np.asarray(steps().images[0]))
    rounds = time_rounds({"steps": steps, "call": call}, args.repeats)
    m = medians(rounds)
    print(table([("pipe.steps() + finish", f"{m['steps']:.3f}", f"{m['call']:.3f}", f"{m['steps'] / m['call']:.3f}",
                  describe_paired(rounds, "steps", "call"))],
                ("contender", "s", "__call__ s", "ratio of medians", "per-round ratio")))


def finite(args, folder) -> None:
    pipe = stepdiff.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def call(check):
        def run():
            pipe.check_finite = check
            return pipe(PROMPT, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                        output_type="latent")
        return run

    rounds = time_rounds({"checked": call(True), "unchecked": call(False)}, args.repeats)
    m = medians(rounds)
    # The check alone (what the loop adds per step: two isfinite reductions), against the time of one step.
    latents = torch.randn(1, 4, 16, 16)
    per_check = []
    checks = 100 if args.smoke else 10_000
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(checks):
            bool(torch.isfinite(latents).all()) and bool(torch.isfinite(latents).all())
        per_check.append((time.perf_counter() - start) / checks)
    check, step = statistics.median(per_check), m["unchecked"] / args.steps
    print(f"the check alone: {check * 1e6:.1f} us per step = {100 * check / step:.3f}% of a {step * 1e3:.1f} ms step")
    print(table([(f"check_finite on / off ({args.steps} steps, latent output)", f"{m['checked']:.4f}", f"{m['unchecked']:.4f}",
                  f"{m['checked'] / m['unchecked']:.4f}", describe_paired(rounds, "checked", "unchecked"))],
                ("measure", "on s", "off s", "ratio of medians", "per-round ratio")))


def threads(args, folder) -> None:
    shared = stepdiff.StableDiffusionPipeline.from_pretrained(folder)
    other = stepdiff.StableDiffusionPipeline.from_pretrained(folder)
    for p in (shared, other):
        p.set_progress_bar_config(disable=True)
    n = args.images

    def work(pipe, seeds, out):
        for s in seeds:
            out[s] = np.asarray(pipe(PROMPT, num_inference_steps=args.steps,
                                     generator=torch.Generator().manual_seed(s)).images[0])

    solo: dict[int, np.ndarray] = {}
    work(shared, range(2 * n), solo)
    rows = []
    for label, pipes in (("two threads, one pipeline object", (shared, shared)),
                         ("two threads, two pipeline objects", (shared, other))):
        out: dict[int, np.ndarray] = {}
        started = time.perf_counter()
        ts = [threading.Thread(target=work, args=(pipes[k], range(k * n, (k + 1) * n), out)) for k in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        elapsed = time.perf_counter() - started
        same = all(np.array_equal(out[s], solo[s]) for s in solo)
        rows.append((label, f"{2 * n / elapsed:.2f}", f"{n / elapsed:.2f}", "yes" if same else "NO"))
    started = time.perf_counter()
    work(shared, range(2 * n), {})
    rows.append(("one thread (reference)", f"{2 * n / (time.perf_counter() - started):.2f}", "—", "—"))
    print(table(rows, ("setting", "images/s total", "images/s per thread", "images equal the single-thread ones")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--images", type=int, default=6, help="images per thread in the threads benchmark")
    parser.add_argument("--only", default="image,steps,threads,finite")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help=SMOKE)
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.images, args.threads, args.steps = 1, 1, 1, 2
    torch.set_num_threads(args.threads)
    folder = args.model or stepdiff.default_model()
    only = set(args.only.split(","))
    if "image" in only:
        image_pipelines(args, folder)
    if "steps" in only:
        step_iterator(args, folder)
    if "threads" in only:
        threads(args, folder)
    if "finite" in only:
        finite(args, folder)


if __name__ == "__main__":
    main()
