"""How far inpainting's kept region drifts from the original without paste-back, on the shipped model.

The README's two inpainting examples (tools/make_figures.py's edits: repaint the background of a red circle, or the
circle's box), 25 steps of the model's scheduler, a few seeds. For each: the PSNR of the kept region (the mask's black
pixels) against the original picture as the library returns it (no paste-back), and after
``stepdiff.images.keep_unmasked`` (the CLI's default) the same for the kept pixels beyond the feathered edge (exact:
inf) and for the whole kept region, its edge's blend included.

    python tools/measure_keep_unmasked.py [--seeds 5] [--steps 25]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import ImageFilter

import stepdiff
from stepdiff.images import KEEP_UNMASKED_FEATHER, keep_unmasked
from stepdiff.shapes.dataset import Sample, render
from tools.make_figures import edit_masks


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = render(Sample("red", "circle", "blue", 32, 32, 30))
    background_mask, box_mask = edit_masks(source)
    pipe = stepdiff.StableDiffusionInpaintPipeline.from_pretrained(stepdiff.default_model())
    pipe.set_progress_bar_config(disable=True)
    cases = [("background repainted, circle kept", "a red circle on a yellow background", background_mask),
             ("circle's box repainted, background kept", "a white square on a blue background", box_mask)]
    original = np.asarray(source)
    everything = []
    band = 2 * math.ceil(3 * KEEP_UNMASKED_FEATHER + 1) + 1  # the feathered edge reaches at most 3 * feather + 1 pixels
    for name, prompt, mask in cases:
        kept = np.asarray(mask) < 128
        far = np.asarray(mask.point(lambda v: 255 if v >= 128 else 0).filter(ImageFilter.MaxFilter(band))) == 0
        raw, beyond, pasted = [], [], []
        for seed in range(args.seeds):
            out = pipe(prompt, image=source, mask_image=mask, num_inference_steps=args.steps,
                       generator=torch.Generator().manual_seed(seed)).images[0]
            raw.append(psnr(np.asarray(out)[kept], original[kept]))
            kept_back = np.asarray(keep_unmasked(source, out, mask))
            beyond.append(psnr(kept_back[far], original[far]))
            pasted.append(psnr(kept_back[kept], original[kept]))
        everything += raw
        print(f"{name} ({kept.sum()} kept pixels of {kept.size}, {far.sum()} beyond the feathered edge): PSNR vs the "
              f"original, seeds 0-{args.seeds - 1}")
        print(f"  library (no paste-back), kept region: {', '.join(f'{v:.1f}' for v in raw)} dB; mean {np.mean(raw):.1f} dB")
        print(f"  keep_unmasked (feather {KEEP_UNMASKED_FEATHER:g}), beyond the edge: {', '.join(f'{v:.1f}' for v in beyond)} dB")
        print(f"  keep_unmasked, whole kept region (edge blend included): {', '.join(f'{v:.1f}' for v in pasted)} dB")
    print(f"all {len(everything)} runs without paste-back: mean {np.mean(everything):.1f} dB, "
          f"range {min(everything):.1f} to {max(everything):.1f} dB")


if __name__ == "__main__":
    main()
