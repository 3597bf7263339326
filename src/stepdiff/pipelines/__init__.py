from .auto import AutoPipelineForText2Image
from .base import StepDiffPipeline
from .stable_diffusion import StableDiffusionPipeline
from .stable_diffusion_3 import StableDiffusion3Pipeline
from .stable_diffusion_xl import StableDiffusionXLPipeline

__all__ = [
    "AutoPipelineForText2Image",
    "StableDiffusion3Pipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StepDiffPipeline",
]
