"""The digits teacher: a small class-conditional UNet trained on scikit-learn's 8x8 digits.

Design (recipe: ``configs/digits_teacher.yaml``):

- ``UNet2DModel`` on 8x8x1, channels (32, 64), two ResNet layers per block, no attention
  (~0.9M parameters), ``num_class_embeds = 11``: the ten digits plus a null class, trained with
  10% label dropout so the one network gives both branches of classifier-free guidance.
- Noise schedule ``squaredcos_cap_v2`` (the cosine schedule, made for small images) and
  **v-prediction**, sampled with a ``DDIMScheduler`` whose ``timestep_spacing="trailing"``.

Why v-prediction and trailing spacing: a one-step student starts at the last timestep, t=999.
There, under a linear-beta schedule, sqrt(alpha_bar) = 0.0064, so an epsilon-predicting network
gives x0 = (x_t - sigma * eps) / alpha, which multiplies its error by ~157 and makes one-step
students diverge. With v-prediction, x0 = alpha * x_t - sigma * v stays well-conditioned at
any alpha (at t=999 it is essentially -v). "Trailing" spacing makes every DDIM step count,
including a single one, start at t=999 -- the timestep the one-step student is trained on and
where the cosine schedule's signal-to-noise ratio is ~0, matching the pure noise the pipeline
starts from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from ..config import EMAConfig, OptimizerConfig, TrainingConfig, load_recipe, to_dict
from ..errors import RecipeError
from ..export import export_info, save_class_conditional_pipeline
from ..training.checkpoint import load_trained_model
from ..training.denoising import DenoisingMethod, DenoisingSection
from ..training.trainer import Trainer
from .data import IMAGE_SIZE, NUM_CLASSES, load_split

PIPELINE_SUBDIR = "pipeline"


@dataclass
class UNetSection:
    """``UNet2DModel`` architecture (image size, channels and classes are fixed by the data)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D")
    norm_num_groups: int = 8


@dataclass
class SchedulerSection:
    """The ``DDIMScheduler`` the teacher is trained for and exported with."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    rescale_betas_zero_snr: bool = False
    clip_sample: bool = False


@dataclass
class DigitsTeacherRecipe:
    unet: UNetSection = field(default_factory=UNetSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    denoising: DenoisingSection = field(default_factory=DenoisingSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)


def build_unet(section: UNetSection):
    from diffusers import UNet2DModel

    if not (len(section.block_out_channels) == len(section.down_block_types) == len(section.up_block_types)):
        raise RecipeError("unet: block_out_channels, down_block_types and up_block_types must have the same length")
    for channels in section.block_out_channels:
        if channels % section.norm_num_groups:
            raise RecipeError(f"unet: every block_out_channels must be divisible by norm_num_groups ({section.norm_num_groups})")
    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(section.block_out_channels),
        layers_per_block=section.layers_per_block,
        down_block_types=tuple(section.down_block_types),
        up_block_types=tuple(section.up_block_types),
        norm_num_groups=section.norm_num_groups,
        num_class_embeds=NUM_CLASSES + 1,  # last index: the null class of CFG
    )


def build_scheduler(section: SchedulerSection):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=section.num_train_timesteps,
        beta_schedule=section.beta_schedule,
        beta_start=section.beta_start,
        beta_end=section.beta_end,
        prediction_type=section.prediction_type,
        timestep_spacing=section.timestep_spacing,
        rescale_betas_zero_snr=section.rescale_betas_zero_snr,
        clip_sample=section.clip_sample,
        set_alpha_to_one=True,
    )


TEACHER_CARD = {
    "title": "stepdistill digits teacher",
    "description": (
        "Class-conditional UNet2DModel (v-prediction, cosine schedule) trained on scikit-learn's 8x8 "
        "handwritten digits; the teacher of stepdistill's CPU reference benchmark. Class 10 is the null "
        "class used for classifier-free guidance."
    ),
    "method": "denoising diffusion training (v-prediction)",
    "dataset": "scikit-learn digits (1,500 training images)",
    "license": "apache-2.0",
    "tags": ["digits", "class-conditional", "teacher"],
    "class_names": [str(i) for i in range(NUM_CLASSES)],
}


def digits_evaluators() -> list:
    """FD and class accuracy of the evaluation samples (the numbers ``stepdistill eval`` reports)."""
    from ..evaluation import make_evaluator

    return [make_evaluator()]


def train_teacher(
    recipe_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    evaluate: bool = True,
) -> Path:
    """Train the digits teacher from a recipe and export its EMA weights.

    The run (checkpoints, tensorboard logs, sample grids) lives in ``output_dir``; the exported
    ``ClassConditionalPipeline`` directory is ``output_dir/pipeline``, which is returned.
    ``overrides``: nested dict merged over the recipe (e.g. ``{"training": {"max_steps": 5}}``).
    """
    recipe = load_recipe(recipe_path, DigitsTeacherRecipe, overrides)
    data = load_split("train")
    torch.manual_seed(recipe.training.seed)  # the initial weights are part of the run's determinism
    unet = build_unet(recipe.unet)
    scheduler = build_scheduler(recipe.scheduler)
    method = DenoisingMethod(
        unet,
        scheduler,
        data.images,
        data.labels,
        optimizer=recipe.optimizer,
        ema=recipe.ema,
        label_dropout=recipe.denoising.label_dropout,
        eval_inference_steps=recipe.denoising.eval_inference_steps,
    )
    trainer = Trainer(
        method,
        recipe.training,
        output_dir,
        resume=resume,
        overwrite=overwrite,
        run_info={
            "recipe": to_dict(recipe),
            "recipe_path": os.fspath(recipe_path),
            "export": export_info(scheduler, role="unet", num_inference_steps=50, model_card_info=TEACHER_CARD),
        },
        evaluators=digits_evaluators() if evaluate else (),
        progress=progress,
    )
    final = trainer.train()
    pipeline_dir = Path(output_dir) / PIPELINE_SUBDIR
    if trainer.accelerator.is_main_process:
        ema_unet = load_trained_model(output_dir, role="unet", ema=True)
        metrics = None
        if final:
            metrics = {
                "model": "teacher (EMA)",
                "steps": recipe.denoising.eval_inference_steps,
                "guidance_scale": 1.0,
                "samples": recipe.training.num_eval_samples,
                **{key.removeprefix("eval/"): value for key, value in final.items()},
            }
        save_class_conditional_pipeline(
            ema_unet,
            scheduler,
            pipeline_dir,
            num_inference_steps=50,
            metrics=metrics,
            metrics_command=f"stepdistill train-teacher {os.fspath(recipe_path)} (evaluation at the last step)" if metrics else None,
            model_card_info=TEACHER_CARD,
            overwrite=True,  # the pipeline is derived from the run: re-exporting replaces it
        )
    trainer.accelerator.wait_for_everyone()
    return pipeline_dir


__all__ = ["DigitsTeacherRecipe", "build_scheduler", "build_unet", "train_teacher"]
