"""The README's pictures, from the shipped model: a grid of outputs with prompts, contact sheets of one
generation previewed from the x0 estimate and from the noisy latents, linear and tiny-decoder previews
side by side (when the model has a preview_decoder/), control silhouettes beside the shapes the shipped
ControlNet made from them, and VAE round-trip crops of held-out renders
for each VAE given with --vae (e.g. shapes-v1's and shapes-v2's).

    python tools/make_figures.py [--out docs/images] [--vae NAME=DIR ...]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import torch
from PIL import Image, ImageDraw

import stepdiff
from stepdiff.preview import PreviewCallback, contact_sheet, tiny_decoder_folder
from stepdiff.shapes.dataset import Sample, render

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


def edit_masks(source: Image.Image) -> tuple[Image.Image, Image.Image]:
    """(background mask, shape mask) of a rendered shape: white repaints (``stepdiff.examples.edit_masks``, which
    also makes the documentation's example masks)."""
    from stepdiff.examples import edit_masks as masks

    return masks(source)


def edits(out: Path) -> None:
    """Image to image and inpainting on the shipped model: re-colour a shape, repaint the background or the shape."""
    source = render(Sample("red", "circle", "blue", 32, 32, 30))
    background_mask, shape_mask = edit_masks(source)
    img2img = stepdiff.StableDiffusionImg2ImgPipeline.from_pretrained(stepdiff.default_model())
    inpaint = stepdiff.StableDiffusionInpaintPipeline.from_pretrained(stepdiff.default_model())
    for p in (img2img, inpaint):
        p.set_progress_bar_config(disable=True)
    g = torch.Generator
    cells = [
        (source, "source: a red circle", "on a blue background"),
        (img2img("a green circle on a blue background", image=source, strength=0.5, generator=g().manual_seed(0)).images[0],
         "img2img, strength 0.5:", '"a green circle ..."'),
        (background_mask.convert("RGB"), "mask: the background", "(white repaints)"),
        (inpaint("a red circle on a yellow background", image=source, mask_image=background_mask,
                 generator=g().manual_seed(0)).images[0], "inpainted:", '"... yellow background"'),
        (shape_mask.convert("RGB"), "mask: the shape's box", "(white repaints)"),
        (inpaint("a white square on a blue background", image=source, mask_image=shape_mask,
                 generator=g().manual_seed(0)).images[0], "inpainted:", '"a white square ..."'),
    ]
    cell, label = 128, 28
    sheet = Image.new("RGB", (len(cells) * cell, cell + label), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (image, line1, line2) in enumerate(cells):
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (k * cell, 0))
        draw.text((k * cell + 3, cell + 1), line1, fill="black")
        draw.text((k * cell + 3, cell + 13), line2, fill="black")
    sheet.save(out / "image_edits.png")


def preview_methods(pipe, out: Path) -> None:
    """One generation previewed from the x0 estimate with the linear table (top) and the tiny decoder (bottom)."""
    prompt = "a yellow triangle on a purple background"
    rows = []
    for method in ("linear", "tiny"):
        cb = PreviewCallback(method=method, every=3, frame_size=64)
        pipe(prompt, num_inference_steps=25, generator=torch.Generator().manual_seed(3), callback_on_step_end=cb)
        rows.append((method, contact_sheet(cb.frames, columns=9)))
    w, h = rows[0][1].size
    combined = Image.new("RGB", (w, 2 * h + 30), "white")
    draw = ImageDraw.Draw(combined)
    labels = {"linear": "linear latent-to-RGB table (method='linear')",
              "tiny": "tiny distilled decoder (method='tiny', AutoencoderTiny)"}
    for k, (method, sheet) in enumerate(rows):
        draw.text((3, 2 + k * (h + 14)), labels[method], fill="black")
        combined.paste(sheet, (0, 14 + k * (h + 14)))
    combined.save(out / "preview_methods.png")


def vae_crops(vaes: dict[str, Path], out: Path, count: int = 6) -> None:
    """Held-out renders and their round trips (encode mean, decode) through each VAE, 3x nearest-neighbour."""
    from diffusers import AutoencoderKL

    from stepdiff.shapes.dataset import EVAL_SEED_BASE, all_combos, random_sample, render

    rng = np.random.default_rng(EVAL_SEED_BASE + 99)
    combos = all_combos()
    picks = [combos[i] for i in rng.choice(len(combos), count, replace=False)]
    truth = np.stack([np.asarray(render(random_sample(rng, c))) for c in picks])
    columns = {"ground truth": truth}
    x = torch.from_numpy(truth).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    for name, folder in vaes.items():
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        columns[name] = ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    cell, label = 3 * 64, 14
    sheet = Image.new("RGB", (len(columns) * cell, label + count * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (name, images) in enumerate(columns.items()):
        draw.text((c * cell + 3, 1), name, fill="black")
        for r, image in enumerate(images):
            sheet.paste(Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST), (c * cell, label + r * cell))
    sheet.save(out / "vae_round_trip.png")


def controlnet_figure(out: Path, controlnet: Path | None = None) -> None:
    """Control silhouettes (top row) beside the shapes the shipped ControlNet made from them (bottom row)."""
    from diffusers import ControlNetModel

    from stepdiff.shapes.dataset import silhouette

    folder = controlnet or stepdiff.default_controlnet()
    pipe = stepdiff.StableDiffusionControlNetPipeline.from_pretrained(
        stepdiff.default_model(), controlnet=ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32))
    pipe.set_progress_bar_config(disable=True)
    cases = [  # held-out combinations (training never saw them), silhouettes at new places and sizes
        ("red", "triangle", "blue", 18, 20, 26), ("green", "circle", "red", 44, 40, 30),
        ("blue", "square", "green", 22, 44, 24), ("yellow", "triangle", "black", 40, 26, 36),
        ("white", "circle", "green", 20, 22, 22), ("purple", "square", "red", 40, 36, 40),
    ]
    samples = [Sample(c, s, b, x, y, size) for c, s, b, x, y, size in cases]
    masks = [silhouette(sample) for sample in samples]
    images = pipe([sample.caption for sample in samples], image=masks, num_inference_steps=25,
                  generator=[torch.Generator().manual_seed(i) for i in range(len(samples))]).images
    cell, label = 128, 28
    sheet = Image.new("RGB", (len(samples) * cell, 2 * cell + label), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (mask, image, sample) in enumerate(zip(masks, images, samples)):
        sheet.paste(mask.resize((cell, cell), Image.Resampling.NEAREST), (k * cell, 0))
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (k * cell, cell))
        draw.text((k * cell + 3, 2 * cell + 1), f"{sample.color} {sample.shape}", fill="black")
        draw.text((k * cell + 3, 2 * cell + 13), f"on {sample.background}", fill="black")
    sheet.save(out / "controlnet.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--only", default="samples,sheets,edits,previews,controlnet",
                        help="comma-separated figures to draw")
    parser.add_argument("--controlnet", type=Path, default=None, help="ControlNet folder (default: the shipped one)")
    parser.add_argument("--vae", nargs="*", default=[], metavar="NAME=DIR",
                        help="VAE folders for the round-trip crops, e.g. shapes-v1=src/stepdiff/models/shapes-v1/vae")
    args = parser.parse_args()
    vaes = {}
    for item in args.vae:
        name, sep, folder = item.partition("=")
        if not sep or not (Path(folder) / "config.json").is_file():
            parser.error(f"--vae takes NAME=DIR with a VAE folder, got {item!r}")
        vaes[name] = Path(folder)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = stepdiff.AutoPipelineForText2Image.from_pretrained(stepdiff.default_model())
    pipe.set_progress_bar_config(disable=True)
    which = set(args.only.split(","))
    written = []
    if "samples" in which:
        grid(pipe, args.out)
        written.append("samples.png")
    if "sheets" in which:
        sheets(pipe, args.out)
        written.append("contact_sheet.png")
    if "edits" in which:
        edits(args.out)
        written.append("image_edits.png")
    if "previews" in which and tiny_decoder_folder(pipe) is not None:
        preview_methods(pipe, args.out)
        written.append("preview_methods.png")
    if "controlnet" in which:
        controlnet_figure(args.out, args.controlnet)
        written.append("controlnet.png")
    if vaes:
        vae_crops(vaes, args.out)
        written.append("vae_round_trip.png")
    print(f"wrote {', '.join(str(args.out / w) for w in written)}")


if __name__ == "__main__":
    main()
