"""The README's pictures, from the shipped model: a grid of outputs with prompts, and contact sheets
of one generation previewed from the x0 estimate and from the noisy latents.

    python tools/make_figures.py [--out docs/images]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import torch
from PIL import Image, ImageDraw

import stepdiff
from stepdiff.preview import PreviewCallback, contact_sheet

PROMPTS = [
    "a red circle on a blue background",
    "a yellow triangle on a purple background",
    "a white square on a black background",
    "a green circle on a orange background",
    "a blue triangle on a white background",
    "a orange square on a green background",
    "a purple circle on a yellow background",
    "a black triangle on a red background",
]


def grid(pipe, out: Path) -> None:
    images = pipe(PROMPTS, num_inference_steps=25, generator=[torch.Generator().manual_seed(i) for i in range(8)]).images
    cell, label = 128, 28
    sheet = Image.new("RGB", (4 * cell, 2 * (cell + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (image, prompt) in enumerate(zip(images, PROMPTS)):
        x, y = (k % 4) * cell, (k // 4) * (cell + label)
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        words = prompt.split()
        draw.text((x + 3, y + cell + 1), " ".join(words[1:3]), fill="black")
        draw.text((x + 3, y + cell + 13), "on " + words[5], fill="black")
    sheet.save(out / "samples.png")


def sheets(pipe, out: Path) -> None:
    prompt = "a yellow triangle on a purple background"
    frames = {}
    for source in ("denoised", "latents"):
        cb = PreviewCallback(source=source, every=3, frame_size=64)
        pipe(prompt, num_inference_steps=25, generator=torch.Generator().manual_seed(3), callback_on_step_end=cb)
        frames[source] = cb.frames
        contact_sheet(cb.frames, columns=9).save(out / f"contact_sheet_{source}.png")
    both = [contact_sheet(frames[s], columns=9) for s in ("denoised", "latents")]
    w, h = both[0].size
    combined = Image.new("RGB", (w, 2 * h + 30), "white")
    draw = ImageDraw.Draw(combined)
    draw.text((3, 2), "x0 estimate (source='denoised', default)", fill="black")
    combined.paste(both[0], (0, 14))
    draw.text((3, h + 16), "noisy latents (source='latents', as in the seed document)", fill="black")
    combined.paste(both[1], (0, h + 28))
    combined.save(out / "contact_sheet.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = stepdiff.AutoPipelineForText2Image.from_pretrained(stepdiff.default_model())
    pipe.set_progress_bar_config(disable=True)
    grid(pipe, args.out)
    sheets(pipe, args.out)
    print(f"wrote {args.out}/samples.png and {args.out}/contact_sheet.png")


if __name__ == "__main__":
    main()
