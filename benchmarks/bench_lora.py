"""LoRA through diffusers' loader mixins (issue 17), on the shipped model, stepdiff against diffusers:

    python benchmarks/bench_lora.py [--repeats 21]

(a) load_lora_weights, fuse_lora, unfuse_lora, unload_lora_weights: seconds each, median over rounds;
(b) a 25-step call with the LoRA loaded but not fused: stepdiff / diffusers (the step overhead of PEFT layers),
    with the diffusers-again noise floor.
The LoRA is random (rank 8 on the UNet's attention projections), saved once in diffusers' format.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

import diffusers
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import stepdiff
from _common import SMOKE, describe_paired, medians, table, time_rounds

PROMPT = "a red circle on a blue background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help=SMOKE)
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.threads, args.steps = 1, 1, 2
    torch.set_num_threads(args.threads)
    folder = stepdiff.default_model()
    ours = stepdiff.StableDiffusionPipeline.from_pretrained(folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        theirs.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                           init_lora_weights=False), adapter_name="tmp")
        layers = get_peft_model_state_dict(theirs.unet, adapter_name="tmp")
        theirs.unet.delete_adapters("tmp")
        diffusers.StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)

        steps = (("load", lambda p: p.load_lora_weights(tmp, adapter_name="x")), ("fuse", lambda p: p.fuse_lora()),
                 ("unfuse", lambda p: p.unfuse_lora()), ("unload", lambda p: p.unload_lora_weights()))
        ops = {name: {"stepdiff": [], "diffusers": []} for name, _ in steps}
        for r in range(args.repeats):
            for label, pipe in (("stepdiff", ours), ("diffusers", theirs))[:: 1 if r % 2 == 0 else -1]:
                for name, op in steps:
                    start = time.perf_counter()
                    op(pipe)
                    ops[name][label].append(time.perf_counter() - start)
        rows = [(name, f"{statistics.median(v['stepdiff']) * 1000:.1f}", f"{statistics.median(v['diffusers']) * 1000:.1f}",
                 f"{statistics.median(v['stepdiff']) / statistics.median(v['diffusers']):.3f}") for name, v in ops.items()]
        print(table(rows, ("operation", "stepdiff ms", "diffusers ms", "ratio")))

        for p in (ours, theirs):
            p.load_lora_weights(tmp, adapter_name="x")

        def call(p):
            return lambda: p(PROMPT, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))

        rounds = time_rounds({"stepdiff": call(ours), "diffusers": call(theirs), "diffusers again": call(theirs)},
                             args.repeats)
        m = medians(rounds)
        print(table([(f"{args.steps} steps, LoRA loaded, not fused", f"{m['stepdiff']:.3f}", f"{m['diffusers']:.3f}",
                      f"{m['stepdiff'] / m['diffusers']:.3f}", describe_paired(rounds, "stepdiff", "diffusers"),
                      f"{m['diffusers again'] / m['diffusers']:.3f}")],
                    ("call", "stepdiff s", "diffusers s", "ratio of medians", "per-round ratio", "noise floor")))


if __name__ == "__main__":
    main()
