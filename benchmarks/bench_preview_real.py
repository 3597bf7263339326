"""Issue 26 item 7: what a tiny-decoder preview costs against a real-size UNet step.

    python benchmarks/bench_preview_real.py [--families sd15,sdxl] [--repeats 5] [--json docs/preview_cost.json]
    python benchmarks/bench_preview_real.py --smoke   # the same code on narrow UNets at 8x8 latents: checks it runs

A TAESD-size decoder (diffusers' default ``AutoencoderTiny`` config: TAESD's layout, 64 channels, random weights,
channels-last as ``load_tiny_decoder`` loads it) decodes one latent through ``stepdiff.preview.tiny_decode`` and
``rgb_to_image`` (what a preview frame does), at SD 1.5's size (4x64x64 -> 512x512) and SDXL's (4x128x128 ->
1024x1024). Against it: one UNet step with classifier-free guidance (one UNet call on a batch of 2) of a
``UNet2DConditionModel`` with the real SD 1.5 config (860M parameters, cross-attention 768) and the real SDXL
config (2.6B parameters, cross-attention 2048, text_time conditioning), random weights, float32, at the same
latent sizes. Timed in interleaved rounds (step, then frame, order alternating), one warm-up each; the share is
the median over rounds of frame / step in the same round, with its range. Also: the linear table's frame, and
the cadence ``method="auto"`` settles on (``PreviewBudget.steady_cadence``) with its share of the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import torch

from _common import SMOKE, smoke_config, table
from bench_fast import SD15_UNET, SDXL_UNET
from stepdiff.preview import PREVIEW_SHARE, builtin_tables, rgb_to_image, steady_cadence, tiny_decode

SMOKE_SIDE = 8  # --smoke: latent side
FAMILIES = {
    # latent side, UNet config, cross-attention width, built-in linear table
    "sd15": (64, SD15_UNET, 768, "sd15"),
    "sdxl": (128, SDXL_UNET, 2048, "sdxl"),
}


def taesd():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny().eval().to(memory_format=torch.channels_last)


def unet_step(family: str, smoke: bool = False):
    """One guided step: a UNet call on a batch of 2 (unconditional and conditional rows)."""
    from diffusers import UNet2DConditionModel

    side, config, width, _ = FAMILIES[family]
    if smoke:
        side, config = SMOKE_SIDE, smoke_config(config)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    params = sum(p.numel() for p in unet.parameters())
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, side, side, generator=g)
    text = torch.randn(2, 77, width, generator=g)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 1280, generator=g),
                                       "time_ids": torch.tensor([[side * 8.0, side * 8, 0, 0, side * 8, side * 8]] * 2)}
    t = torch.tensor(500)

    def step():
        with torch.inference_mode():
            return unet(sample, t, encoder_hidden_states=text, **kwargs).sample

    return step, params


def rounds(fns: dict, repeats: int) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            fns[name]()
            out[name].append(time.perf_counter() - started)
    return out


def measure(family: str, repeats: int, decoder, smoke: bool = False) -> dict:
    side, _, _, table_name = FAMILIES[family]
    side = SMOKE_SIDE if smoke else side
    step, params = unet_step(family, smoke)
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(2))
    linear = builtin_tables()[table_name]
    fns = {
        "unet step (batch 2)": step,
        "tiny frame": lambda: rgb_to_image(tiny_decode(decoder, latents)[0]),
        "linear frame": lambda: linear.to_image(latents[0]),
    }
    t = rounds(fns, repeats)
    steps, tiny, lin = t["unet step (batch 2)"], t["tiny frame"], t["linear frame"]
    shares = [f / s for f, s in zip(tiny, steps)]
    d, s = statistics.median(tiny), statistics.median(steps)
    k = steady_cadence(d, s)
    result = {
        "latent": [4, side, side], "image": [side * 8, side * 8], "unet_parameters": params,
        "decoder_parameters": sum(p.numel() for p in decoder.parameters() if p.requires_grad),
        "rounds": repeats, "step_seconds": steps, "tiny_frame_seconds": tiny, "linear_frame_seconds": lin,
        "step_median": s, "tiny_frame_median": d, "linear_frame_median": statistics.median(lin),
        "tiny_share_of_a_step_median": statistics.median(shares), "tiny_share_of_a_step_range": [min(shares), max(shares)],
        "tiny_share_every_step": d / (s + d),
        "auto_cadence": k, "auto_share_of_run": d / (k * s + d),
        "linear_share_every_step": statistics.median(lin) / (s + statistics.median(lin)),
    }
    del step
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="sd15,sdxl")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the results here (merged into the file)")
    parser.add_argument("--smoke", action="store_true", help=SMOKE)
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.threads = 1, 1
    torch.set_num_threads(args.threads)
    decoder = taesd()
    results = {}
    for family in args.families.split(","):
        print(f"{family}: building the UNet and timing {args.repeats} rounds ...", flush=True)
        results[family] = measure(family, args.repeats, decoder, args.smoke)
        r = results[family]
        print(table([
            ("UNet step, CFG (batch 2)", f"{r['step_median']:.2f} s",
             f"{min(r['step_seconds']):.2f}-{max(r['step_seconds']):.2f} s"),
            ("TAESD-size tiny frame", f"{r['tiny_frame_median'] * 1000:.0f} ms",
             f"{min(r['tiny_frame_seconds']) * 1000:.0f}-{max(r['tiny_frame_seconds']) * 1000:.0f} ms"),
            ("linear table frame", f"{r['linear_frame_median'] * 1000:.1f} ms", ""),
            ("tiny frame / step (per round)", f"{r['tiny_share_of_a_step_median']:.1%}",
             f"{r['tiny_share_of_a_step_range'][0]:.1%}-{r['tiny_share_of_a_step_range'][1]:.1%}"),
            ("tiny at every step: share of the run", f"{r['tiny_share_every_step']:.1%}", ""),
            ("auto: cadence, share of the run", f"every {r['auto_cadence']}, {r['auto_share_of_run']:.1%}", ""),
        ], (f"{family}: {r['unet_parameters'] / 1e6:.0f}M-parameter UNet, latent {r['latent']}", "median", "range")),
            flush=True)
    meta = {
        "command": "python benchmarks/bench_preview_real.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "device": "cpu", "dtype": "float32", "share_goal": PREVIEW_SHARE,
        "note": "random weights, real configs; the machine was shared with other work (load average "
                f"{os.getloadavg()[0]:.1f} at the end)",
    }
    if args.json is not None:
        data = json.loads(args.json.read_text()) if args.json.is_file() else {}
        data.setdefault("real_size", {}).update(results)
        data["real_size_meta"] = meta
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json}")
    assert all(math.isfinite(r["step_median"]) for r in results.values())


if __name__ == "__main__":
    main()
