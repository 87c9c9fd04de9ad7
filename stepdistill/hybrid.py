"""Hybrid inference: the teacher for the first k steps, the student for the rest.

Gandikota & Bau 2025, "Distilling Diversity and Control in Diffusion Models": few-step students
lose sample diversity, which is decided in the first denoising steps; letting the teacher take
those steps restores it for k teacher evaluations.

:func:`save_hybrid_pipeline` (``stepdistill hybrid STUDENT_DIR OUTPUT_DIR --teacher DIR``) writes
one pipeline directory that carries both networks: ``HybridClassConditionalPipeline``
(``pipelines/hybrid_class_conditional_pipeline.py``, shipped in the directory, loaded with
``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)``) for class-conditional pixel
teachers and their students (digits). ``pipe(labels, teacher_steps=k)`` switches k per call.
For latent teachers (SD, SDXL, Flux) the same inference is a recipe over the two stock
pipelines: see docs/step_halving.md (a ``callback_on_step_end`` that swaps the denoiser).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import StepdistillError
from .export import diffusers_version, pipeline_source, write_pipeline_directory

HYBRID_PIPELINE_FILE = "hybrid_class_conditional_pipeline.py"


def _load_class_conditional(path: str | os.PathLike, what: str):
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise StepdistillError(f"{what} {path} is not a diffusers pipeline directory (no model_index.json)")
    enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # errors stay one line on stderr
    try:
        pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    except Exception as exc:  # diffusers raises many types for broken directories
        raise StepdistillError(f"cannot load the {what} pipeline in {path}: {exc}".splitlines()[0]) from None
    finally:
        if enabled:
            diffusers_logging.enable_progress_bar()
    unet = getattr(pipe, "unet", None)
    if type(pipe).__name__ != "ClassConditionalPipeline" or getattr(getattr(unet, "config", None), "num_class_embeds", None) is None:
        raise StepdistillError(f"{what} {path}: hybrid pipelines are built from class-conditional pixel pipelines (ClassConditionalPipeline); "
                               f"got {type(pipe).__name__} (latent teachers: see the two-pipeline recipe in docs/step_halving.md)")
    if getattr(unet.config, "time_cond_proj_dim", None) is not None:
        raise StepdistillError(f"{what} {path}: a w-conditioned UNet (time_cond_proj_dim) cannot be combined in a hybrid pipeline")
    return pipe


def _check_compatible(student, teacher) -> None:
    from .schedule import prediction_type_of, schedule_from_scheduler

    keys = ("in_channels", "out_channels", "sample_size", "num_class_embeds")
    for key in keys:
        if getattr(student.unet.config, key) != getattr(teacher.unet.config, key):
            raise StepdistillError(f"the student and the teacher differ in unet.{key}: {getattr(student.unet.config, key)} vs "
                                   f"{getattr(teacher.unet.config, key)}")
    ps, pt = prediction_type_of(student.scheduler), prediction_type_of(teacher.scheduler)
    if ps != pt:
        raise StepdistillError(f"the student predicts {ps} and the teacher {pt}: the hybrid pipeline steps both with the student's "
                               "scheduler, so they must share a parameterization")
    a, b = schedule_from_scheduler(student.scheduler), schedule_from_scheduler(teacher.scheduler)
    if a.kind == "vp" and b.kind == "vp" and a.num_train_timesteps != b.num_train_timesteps:
        cut = " (student.init_timestep)" if a.num_train_timesteps < b.num_train_timesteps else ""
        raise StepdistillError(f"the student's noise schedule ends at timestep {a.num_train_timesteps - 1}{cut}, "
                               f"the teacher's at {b.num_train_timesteps - 1}: a hybrid pipeline needs the whole schedule")
    if a.kind != b.kind or (a.kind == "vp" and not (a.alphas_cumprod - b.alphas_cumprod).abs().max() < 1e-9):
        raise StepdistillError("the student and the teacher have different noise schedules")


def save_hybrid_pipeline(
    student_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    teacher_steps: int = 1,
    teacher_guidance_scale: float = 1.0,
    num_inference_steps: int | None = None,
    overwrite: bool = False,
) -> Path:
    """A ``HybridClassConditionalPipeline`` directory: the student of ``student_dir`` (its network,
    scheduler and guidance) and the teacher network of ``teacher_dir`` (a registered name such as
    ``digits`` works), sampling ``num_inference_steps`` steps (default: the student's, or
    ``teacher_steps`` + the student's when the student has no more than ``teacher_steps``)
    of which the first ``teacher_steps`` run the teacher with ``teacher_guidance_scale``
    (``uncond + w (cond - uncond)``)."""
    from .teachers import resolve_teacher_path

    student = _load_class_conditional(student_dir, "student")
    teacher = _load_class_conditional(resolve_teacher_path(teacher_dir), "teacher")
    _check_compatible(student, teacher)
    student_steps = int(student.config.default_num_inference_steps)
    if num_inference_steps is None:
        num_inference_steps = student_steps if student_steps > teacher_steps else teacher_steps + student_steps
    if teacher_steps < 0 or num_inference_steps < 1 or teacher_steps > num_inference_steps:
        raise StepdistillError(f"teacher_steps must lie in [0, num_inference_steps={num_inference_steps}]; got {teacher_steps}")
    guidance = float(student.config.default_guidance_scale)
    card = {
        "title": f"Hybrid sampler: teacher for {teacher_steps} of {num_inference_steps} steps, then the student",
        "description": (f"The first {teacher_steps} step(s) run the teacher (`{os.fspath(teacher_dir)}`, guidance {teacher_guidance_scale:g}), "
                        f"the rest the student (`{os.fspath(student_dir)}`), on the student's scheduler "
                        "(Gandikota & Bau 2025, \"Distilling Diversity and Control in Diffusion Models\"). "
                        "`pipe(labels, teacher_steps=k)` changes k per call."),
        "method": "hybrid inference (teacher first steps, student after)",
        "base_model": os.fspath(teacher_dir),
        "tags": ["stepdistill", "hybrid-inference"],
    }

    def build(tmp: Path) -> None:
        student.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        teacher.unet.save_pretrained(tmp / "teacher_unet", safe_serialization=True)
        student.scheduler.save_pretrained(tmp / "scheduler")
        shutil.copyfile(pipeline_source(HYBRID_PIPELINE_FILE), tmp / HYBRID_PIPELINE_FILE)
        index = {
            "_class_name": [Path(HYBRID_PIPELINE_FILE).stem, "HybridClassConditionalPipeline"],
            "_diffusers_version": diffusers_version(),
            "default_num_inference_steps": int(num_inference_steps),
            "default_guidance_scale": guidance,
            "default_teacher_steps": int(teacher_steps),
            "default_teacher_guidance_scale": float(teacher_guidance_scale),
            "scheduler": ["diffusers", type(student.scheduler).__name__],
            "teacher_unet": ["diffusers", type(teacher.unet).__name__],
            "unet": ["diffusers", type(student.unet).__name__],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    return write_pipeline_directory(output_dir, overwrite, build, num_inference_steps=int(num_inference_steps),
                            guidance_scale=guidance, model_card_info=card)


__all__ = ["HYBRID_PIPELINE_FILE", "save_hybrid_pipeline"]
