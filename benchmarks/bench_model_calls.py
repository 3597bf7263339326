"""What running a model call under torch.inference_mode saves, call by call.

    python benchmarks/bench_model_calls.py [--repeats 300] [--smoke]

stepdiff runs each denoiser call under ``torch.inference_mode`` where diffusers uses ``no_grad``; the
calls are otherwise identical. This replays one real guided call of (1) the shipped model's UNet and
(2) the tiny SD3 benchmark transformer (the same one ``bench_guidance.py --only sd3`` uses), with the
inputs captured from a stepdiff pipeline run, alternating the two modes call by call. Reports
inference_mode / no_grad: the median of per-round ratios with its 95% bootstrap interval.
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
from _common import SMOKE, TINY_SD3, TINY_SD3_SMOKE, describe_paired, medians, table, time_rounds
from stepdiff.testing import make_tiny_sd3


def captured_call(pipe, model: torch.nn.Module, **kwargs):
    """The positional and keyword inputs of the model's first call in one pipeline run."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)), with_kwargs=True)
    try:
        pipe(num_inference_steps=2, output_type="latent", **kwargs)
    finally:
        handle.remove()
    return seen[0]


def ab(name: str, model: torch.nn.Module, inputs, repeats: int) -> tuple[str, ...]:
    args, kwargs = inputs

    def call(mode):
        def run():
            with mode():
                model(*args, **kwargs)
        return run

    rounds = time_rounds({"no_grad": call(torch.no_grad), "inference_mode": call(torch.inference_mode)},
                         repeats=repeats, warmup=3)
    t = medians(rounds)
    return (name, f"{t['no_grad'] * 1e3:.1f}", f"{t['inference_mode'] * 1e3:.1f}",
            describe_paired(rounds, "inference_mode", "no_grad"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help=SMOKE)
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    torch.set_num_threads(1 if args.smoke else 2)
    diffusers.utils.logging.disable_progress_bar()

    rows = []
    sd = stepdiff.StableDiffusionPipeline.from_pretrained(stepdiff.default_model())
    sd.set_progress_bar_config(disable=True)
    inputs = captured_call(sd, sd.unet, prompt="a red circle on a blue background", guidance_scale=7.5)
    rows.append(ab("shipped model UNet, guided batch of 2", sd.unet, inputs, args.repeats))

    with tempfile.TemporaryDirectory() as tmp:
        sd3 = stepdiff.StableDiffusion3Pipeline.from_pretrained(
            make_tiny_sd3(tmp, **(TINY_SD3_SMOKE if args.smoke else TINY_SD3)))
    sd3.set_progress_bar_config(disable=True)
    inputs = captured_call(sd3, sd3.transformer, prompt="a red car", guidance_scale=7.0)
    rows.append(ab("tiny SD3 transformer, guided batch of 2", sd3.transformer, inputs, args.repeats))

    print(f"\none model call, median of {args.repeats} alternating calls per mode, torch threads 2\n")
    print(table(rows, ("model call", "no_grad ms", "inference_mode ms", "inference_mode / no_grad, per round")))


if __name__ == "__main__":
    main()
