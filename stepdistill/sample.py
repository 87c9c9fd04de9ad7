"""``stepdistill sample``: a sample grid from any pixel-space pipeline directory (ours or stock)."""

from __future__ import annotations

import os

import torch

from .errors import StepdistillError
from .images import save_image_grid
from .teachers import detect_family


def load_pixel_pipeline(pipeline_dir: str | os.PathLike):
    """Load a class-conditional (ours) or unconditional (stock DDPM/DDIM) pipeline directory."""
    from diffusers import DiffusionPipeline

    if detect_family(pipeline_dir) != "pixel":
        raise StepdistillError(f"{pipeline_dir}: only pixel-space pipelines can be sampled by this command for now")
    pipe = DiffusionPipeline.from_pretrained(os.fspath(pipeline_dir), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_grid(
    pipeline_dir,
    output: str | os.PathLike,
    class_labels: list[int] | None = None,
    num_images: int = 100,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
) -> str:
    pipe = load_pixel_pipeline(pipeline_dir)
    generator = torch.Generator().manual_seed(seed)
    num_classes = getattr(pipe, "num_classes", None)
    if num_classes is None:  # stock unconditional pipeline
        if class_labels:
            raise StepdistillError(f"{pipeline_dir} is unconditional: drop --class-labels")
        # stock DDPM/DDIM pipelines return numpy [B, H, W, C] in [0, 1]
        images = pipe(batch_size=num_images, generator=generator, num_inference_steps=num_inference_steps, output_type="np").images
        images = torch.as_tensor(images).permute(0, 3, 1, 2)
        nrow = None
    else:
        labels = class_labels if class_labels else [i % num_classes for i in range(num_images)]
        images = pipe(class_labels=labels, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=generator, output_type="pt").images
        nrow = num_classes if not class_labels else None
    return save_image_grid(images * 2 - 1, output, nrow=nrow)

