"""The recipe schema every distiller shares.

A distillation recipe is one YAML file whose top-level ``method:`` picks the distiller
(:mod:`stepdistill.distillers.registry`); the sections below mean the same thing for every
method, and each method adds its own section (``dmd:``, ``consistency:``, ...)::

    method: dmd2
    teacher:      {path, guidance_scale, height, width}          # what is distilled
    student:      {num_steps, lora_rank, lora_target_modules}    # what is trained
    data:         {images, prompts, prompts_file, latents, ...}  # what it sees (the data layer)
    training:     {max_steps, batch_size, seed, ...}             # the shared Trainer
    optimizers:   {student: {lr, ...}, fake_score: {...}}        # AdamW per role
    ema:          {decay}                                        # of the student; null: none
    evaluation:   {feature, reference, benchmark, ...}           # periodic FD and the end-of-run table
    memory:       {gradient_checkpointing, teacher_dtype, ...}   # memory levers (docs/memory.md)

Guidance convention everywhere: ``uncond + w (cond - uncond)``; ``w = 1`` is no guidance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..config import EMAConfig, OptimizerConfig, TrainingConfig, bounded
from ..evaluation.benchmarks import EvaluationSection


@dataclass
class TeacherSection:
    path: Optional[str] = None  # diffusers pipeline directory, a single checkpoint file (+ family), or a registered name ("digits")
    family: Optional[str] = None  # single files only: sd / sdxl; directories are detected from model_index.json
    config: Optional[str] = None  # single files only: a local diffusers directory of the same architecture
    guidance_scale: float = bounded(1.0, ge=0)  # the teacher's CFG, uncond + w (cond - uncond); 1 = none
    height: Optional[int] = bounded(None, ge=1)  # pixels; None: the model's native size
    width: Optional[int] = bounded(None, ge=1)


@dataclass
class StudentSection:
    num_steps: int = bounded(1, ge=1)  # K: the exported pipeline's step count
    timesteps: Optional[list[float]] = None  # optional: checked against the exported scheduler's
    # one-step generators of VP teachers (DMD, score distillation): the timestep G runs at from unit
    # noise -- SiD's sigma_init; default (null) the last training timestep. Unconditional teachers
    # want it: at T - 1 the teacher's x0 estimate is the same mean image for every noise
    init_timestep: Optional[int] = bounded(None, ge=1)
    backward_simulation: bool = True  # DMD, K > 1: inputs from the student's own earlier steps
    lora_rank: int = bounded(0, ge=0)  # 0: full fine-tune; > 0: a LoRA student (exported as a LoRA file for latent teachers)
    lora_target_modules: list[str] = field(default_factory=list)  # empty: the family's default


@dataclass
class DataSection:
    """What the run reads (stepdistill.data): real images for GANs / consistency training, the
    conditions (class labels, prompts) of data-free methods."""

    images: Optional[str] = None  # an image folder, a `datasets` directory, or a registered name ("digits")
    resolution: Optional[int] = bounded(None, ge=1)  # resize + crop to this; None: the teacher's size
    center_crop: bool = True
    random_flip: bool = False
    image_column: Optional[str] = None  # `datasets`: default: the first Image feature
    caption_column: Optional[str] = None  # `datasets`: default: text / caption / prompt
    label_column: Optional[str] = None  # `datasets`: default: the ClassLabel feature
    split: Optional[str] = None  # `datasets` DatasetDict split (default train)
    latents: Optional[str] = None  # latent teachers: a latent cache (shard directory or one .safetensors)
    prompts: list[str] = field(default_factory=list)  # text-to-image teachers: training prompts
    prompts_file: Optional[str] = None  # .txt / .csv / .jsonl / COCO captions .json


@dataclass
class MemorySection:
    """Memory levers every distiller honours (stepdistill/distillers/memory.py; `stepdistill plan
    RECIPE` estimates what each saves, docs/memory.md)."""

    gradient_checkpointing: bool = False  # the trained networks recompute activations in backward (less memory, more compute)
    teacher_dtype: Optional[Literal["bf16", "fp16"]] = None  # frozen denoiser weights (teacher, LoRA bases); trained weights stay fp32; ignored (warning) without training.mixed_precision
    release_encoders: bool = False  # text encoders (and the VAE unless real images are encoded every step) stay in host memory after filling the caches
    attention: Literal["auto", "sdpa", "xformers"] = "auto"  # auto: xformers where installed and on CUDA, else PyTorch SDPA


@dataclass
class DistillRecipe:
    """Sections shared by every distiller; a method's recipe class adds its own section."""

    method: str
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizers: dict[str, OptimizerConfig] = field(default_factory=dict)
    ema: Optional[EMAConfig] = field(default_factory=EMAConfig)  # of the student; null: none
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    memory: MemorySection = field(default_factory=MemorySection)


DEFAULT_LORA_TARGETS = {
    "pixel": ["conv1", "conv2"],
    "sd": ["to_q", "to_k", "to_v", "to_out.0"],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0"],
    "flux": ["to_q", "to_k", "to_v", "to_out.0"],
    "sd3": ["to_q", "to_k", "to_v", "to_out.0"],
    "dit": ["to_q", "to_k", "to_v", "to_out.0"],
}


def lora_targets(family: str, modules: list[str]) -> list[str]:
    """The recipe's LoRA target modules, or the family's default."""
    return list(modules) or DEFAULT_LORA_TARGETS.get(family, [])


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "DataSection",
    "DistillRecipe",
    "EvaluationSection",
    "MemorySection",
    "StudentSection",
    "TeacherSection",
    "lora_targets",
]
