"""The seed document's three examples, verbatim except: imports diffusers -> stepdiff, a local tiny
model folder for the hub id, and (on a machine without CUDA) device_map="cpu"."""

import torch

EXAMPLE_CFG_CUTOFF = '''
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
from diffusers.callbacks import SDXLCFGCutoffCallback

callback = SDXLCFGCutoffCallback(cutoff_step_ratio=0.4)
# if using cutoff_step_index
# callback = SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=10)

pipeline = StableDiffusionXLPipeline.from_pretrained(
    "stabilityai/stable-diffusion-xl-base-1.0",
    torch_dtype=torch.float16,
    device_map="cuda"
)
pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config, use_karras_sigmas=True)

prompt = "a sports car at the road, best quality, high quality, high detail, 8k resolution"
output = pipeline(
    prompt=prompt,
    negative_prompt="",
    guidance_scale=6.5,
    num_inference_steps=25,
    generator=generator,
    callback_on_step_end=callback,
)
'''

EXAMPLE_EARLY_STOP = '''
from diffusers import StableDiffusionXLPipeline

def interrupt_callback(pipeline, i, t, callback_kwargs):
    stop_idx = 10
    if i == stop_idx:
        pipeline._interrupt = True

    return callback_kwargs

pipeline = StableDiffusionXLPipeline.from_pretrained(
    "stable-diffusion-v1-5/stable-diffusion-v1-5"
)
num_inference_steps = 50

pipeline(
    "A photo of a cat",
    num_inference_steps=num_inference_steps,
    callback_on_step_end=interrupt_callback,
)
'''

EXAMPLE_PREVIEW = '''
def latents_to_rgb(latents):
    weights = (
        (60, -60, 25, -70),
        (60,  -5, 15, -50),
        (60,  10, -5, -35),
    )

    weights_tensor = torch.t(torch.tensor(weights, dtype=latents.dtype).to(latents.device))
    biases_tensor = torch.tensor((150, 140, 130), dtype=latents.dtype).to(latents.device)
    rgb_tensor = torch.einsum("...lxy,lr -> ...rxy", latents, weights_tensor) + biases_tensor.unsqueeze(-1).unsqueeze(-1)
    image_array = rgb_tensor.clamp(0, 255).byte().cpu().numpy().transpose(1, 2, 0)

    return Image.fromarray(image_array)

def decode_tensors(pipe, step, timestep, callback_kwargs):
    latents = callback_kwargs["latents"]

    image = latents_to_rgb(latents[0])
    image.save(f"{step}.png")

    return callback_kwargs

import torch
from PIL import Image
from diffusers import AutoPipelineForText2Image

pipeline = AutoPipelineForText2Image.from_pretrained(
    "stabilityai/stable-diffusion-xl-base-1.0",
    torch_dtype=torch.float16,
    device_map="cuda"
)

image = pipeline(
    prompt="A croissant shaped like a cute bear.",
    negative_prompt="Deformed, ugly, bad anatomy",
    callback_on_step_end=decode_tensors,
    callback_on_step_end_tensor_inputs=["latents"],
).images[0]
'''

HUB_IDS = ("stabilityai/stable-diffusion-xl-base-1.0", "stable-diffusion-v1-5/stable-diffusion-v1-5")


def port(source: str, folder) -> str:
    """The only edits a user makes: the import lines, and a local folder for the hub id."""
    source = source.replace("from diffusers", "from stepdiff")
    for hub_id in HUB_IDS:
        source = source.replace(f'"{hub_id}"', repr(str(folder)))
    if not torch.cuda.is_available():
        source = source.replace('device_map="cuda"', 'device_map="cpu"')
    return source


def test_source_edits_are_only_imports_and_model_ids(sdxl_folder):
    for example in (EXAMPLE_CFG_CUTOFF, EXAMPLE_EARLY_STOP, EXAMPLE_PREVIEW):
        ported = port(example, sdxl_folder)
        changed = [b for a, b in zip(example.splitlines(), ported.splitlines()) if a != b]
        assert all("stepdiff" in line or str(sdxl_folder) in line or "device_map" in line for line in changed)
        assert "diffusers" not in ported


def test_cfg_cutoff_example(sdxl_folder):
    scope = {"generator": torch.Generator().manual_seed(0)}  # the document uses a generator it never defines
    exec(port(EXAMPLE_CFG_CUTOFF, sdxl_folder), scope)
    output, pipeline = scope["output"], scope["pipeline"]
    assert type(pipeline).__module__.startswith("stepdiff")
    assert len(output.images) == 1 and output.images[0].size == (32, 32)
    assert output.record.rows_per_step == [2] * 11 + [1] * 14  # guidance off after step int(25 * 0.4) = 10


def test_early_stopping_example(sdxl_folder):
    scope: dict = {}
    exec(port(EXAMPLE_EARLY_STOP, sdxl_folder), scope)
    pipeline = scope["pipeline"]
    assert pipeline.interrupt is True
    out = pipeline("A photo of a cat", num_inference_steps=50, callback_on_step_end=scope["interrupt_callback"])
    assert out.interrupted and out.steps_completed == 11


def test_display_intermediate_images_example(sdxl_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(port(EXAMPLE_PREVIEW, sdxl_folder), scope)
    assert scope["image"].size == (32, 32)
    written = sorted(int(p.stem) for p in tmp_path.glob("*.png"))
    assert written == list(range(50))
