"""One way to run every distiller: recipe -> teacher -> data -> method -> trainer -> export -> report.

:func:`distill` is what ``stepdistill distill RECIPE [--set key=value ...]`` calls for every
method (the recipe's ``method:`` picks the family through :mod:`.registry`). A run directory
holds ``run.json`` (the validated recipe, the working directory it ran in), checkpoints,
``curve.jsonl``, sample grids and, at the end:

- ``pipeline/``: the student as a drop-in diffusers pipeline (stock class for the teacher's
  family), or ``lora/`` for a LoRA student of a latent teacher (a diffusers LoRA file plus its
  scheduler, loaded with ``load_lora_weights`` next to the untouched teacher);
- ``report/``: the end-of-run table -- the student's row next to the teacher's -- from the
  benchmark the recipe's data belongs to (digits), else FD against the recipe's real images.

:func:`export_run_dir` (``stepdistill export RUN_DIR OUT``) rebuilds the same artefact from any
checkpoint of a run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..config import to_dict
from ..errors import RecipeError, StepdistillError
from .base import Distiller, RunData
from .common import has_lora, merge_lora
from .recipe import DistillRecipe
from .registry import load_distill_recipe, method_entry
from .run_data import condition_pool, real_samples
from .student import save_adapter_pipeline, save_student_lora, save_student_pipeline

RUN_KIND = "distill"
# keys a resumed run may change: how long it trains and how often it reports
RESUMABLE_CHANGES = ("training.max_steps", "training.log_every", "training.eval_every", "training.checkpoint_every",
                     "training.keep_checkpoints", "evaluation.report", "evaluation.report_samples")


# -- the pieces -------------------------------------------------------------------------------
def load_recipe_teacher(recipe: DistillRecipe, base_dir: str | os.PathLike | None = None):
    """The recipe's teacher (a directory, a single file + family, or a registered name)."""
    from ..teachers import load_teacher

    t = recipe.teacher
    if not t.path:
        raise RecipeError("teacher.path is required: a diffusers pipeline directory (e.g. --set teacher.path=DIR)")
    path = _resolve(t.path, base_dir)
    kwargs = {"config": _resolve(t.config, base_dir)} if t.config else {}
    return load_teacher(path, family=t.family, **kwargs)


def _resolve(path: str | None, base_dir) -> str | None:
    """A recipe path relative to the directory the run started in (for rebuilding a finished run)."""
    if path is None or base_dir is None or os.path.isabs(path):
        return path
    candidate = os.path.join(os.fspath(base_dir), path)
    return candidate if os.path.exists(candidate) else path


def open_run_data(teacher, recipe: DistillRecipe) -> RunData:
    """The conditions pool and the real samples (None: a data-free run), with a one-line summary."""
    real = real_samples(teacher, recipe)
    return RunData(pool=condition_pool(teacher, recipe, real), real=real)


def build_method(teacher, recipe: DistillRecipe, data: RunData | None) -> Distiller:
    return method_entry(recipe.method).load("build")(teacher, recipe, data)


def describe_data(data: RunData) -> str:
    if data.real is None:
        return f"data-free: {len(data.pool)} condition(s), no real images"
    summary = data.real.dataset.summary() if data.real.dataset is not None else f"latent cache {data.real.source}: {len(data.real)} rows"
    return f"real data: {summary}"


def _run_info(recipe: DistillRecipe, recipe_path) -> dict[str, Any]:
    return {"kind": RUN_KIND, "method": recipe.method, "recipe": to_dict(recipe),
            "recipe_path": None if isinstance(recipe_path, Mapping) else os.fspath(recipe_path), "cwd": os.getcwd()}


def check_resume(output_dir: Path, recipe: DistillRecipe) -> None:
    """``--resume`` continues the same run: a recipe differing in anything but the step budget
    (and reporting) is refused, naming the keys."""
    run_file = output_dir / "run.json"
    if not run_file.is_file():
        return
    before = json.loads(run_file.read_text()).get("recipe")
    if before is None:
        return
    changed = [k for k in sorted(set(_flat(before)) | set(_flat(to_dict(recipe))))
               if _flat(before).get(k) != _flat(to_dict(recipe)).get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        raise StepdistillError(f"--resume: the recipe differs from the run's in {', '.join(changed)} (only the step budget may change); "
                               "use the run's recipe, or start a new run")


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# -- export ---------------------------------------------------------------------------------------
def artefact_dir(method: Distiller, run_dir: str | os.PathLike) -> Path:
    """``lora/`` for a LoRA student of a latent teacher, ``pipeline/`` otherwise (a pixel teacher's
    adapters: the untouched teacher pipeline with the adapter file inside)."""
    return Path(run_dir) / ("lora" if method.lora_student and method.teacher.is_latent else "pipeline")


def model_card(method: Distiller, recipe_path) -> dict[str, Any]:
    teacher = method.recipe.teacher.path
    return {
        "title": f"stepdistill {method.recipe.method.upper()} student ({method.num_steps} step{'s' if method.num_steps > 1 else ''})",
        "description": f"A {method.num_steps}-step student of `{teacher}`, trained with stepdistill ({method.description}).",
        "base_model": teacher,
        "method": method.description,
        "license": "other",
        "tags": ["stepdistill", "distillation", method.recipe.method, "few-step"],
    }


def export_student(method: Distiller, network: torch.nn.Module, output: str | os.PathLike, *, card=None,
                   metrics=None, metrics_command=None, overwrite: bool = True) -> Path:
    """Write the trained ``network`` as the run's artefact at ``output`` (see :func:`artefact_dir`)
    and any scheduler variants next to it; returns ``output``."""
    network = method.export_network(network)
    out = Path(output)
    if method.lora_student and method.teacher.is_latent:
        return save_student_lora(method.teacher, network, method.scheduler, out, overwrite=overwrite)
    common = dict(guidance_scale=method.export_guidance_scale, trained_guidance_range=method.trained_guidance_range,
                  model_card_info=card, overwrite=overwrite)
    if method.keeps_base:  # pixel teachers: the untouched teacher's pipeline with the adapter file inside
        return save_adapter_pipeline(method.teacher, network, method.scheduler, method.num_steps, out, metrics=metrics,
                                     metrics_command=metrics_command, **common)
    full = merge_lora(network) if has_lora(network) else network
    path = save_student_pipeline(method.teacher, full, method.scheduler, method.num_steps, out, metrics=metrics,
                                 metrics_command=metrics_command, **common)
    for name, scheduler in method.export_variants().items():
        save_student_pipeline(method.teacher, full, scheduler, method.num_steps, out.parent / name, **common)
    return path


def export_run_dir(run_dir: str | os.PathLike, output_dir: str | os.PathLike, *, ema: bool = True, overwrite: bool = False,
                   checkpoint: str | os.PathLike | None = None) -> Path:
    """Rebuild a distillation run's student from a checkpoint (default: the latest) and export it
    exactly as the run does at its end."""
    from ..training.checkpoint import latest_checkpoint, load_role_weights

    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    recipe = load_distill_recipe(info["recipe"])
    teacher = load_recipe_teacher(recipe, info.get("cwd"))
    method = build_method(teacher, recipe, None)
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        raise StepdistillError(f"no complete checkpoint in {run_dir}")
    use_ema = ema and method.export_from_ema
    network = load_role_weights(path, "student", method.student, ema=use_ema)
    return export_student(method, network, output_dir, card=model_card(method, info.get("recipe_path")), overwrite=overwrite)


# -- evaluation -----------------------------------------------------------------------------------
def run_benchmark(teacher, recipe: DistillRecipe):
    """The benchmark that scores this run (periodic FD, end-of-run table), or None without real data."""
    from ..evaluation.benchmarks import benchmark_for
    from ..teachers import resolve_teacher_path
    from .run_data import image_channels, image_size

    return benchmark_for(recipe.evaluation, recipe.data.images, resolve_teacher_path(recipe.teacher.path),
                         image_channels(teacher), image_size(teacher, recipe))


# -- the run --------------------------------------------------------------------------------------
def distill(
    recipe_path: str | os.PathLike | Mapping[str, Any],
    output_dir: str | os.PathLike,
    *,
    overrides: Mapping[str, Any] | None = None,
    set_items: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    evaluate: bool = True,
    report: bool | None = None,
) -> Path:
    """Train the recipe's student and export it; returns the artefact directory.

    ``overrides`` (nested dict) and ``set_items`` (``key.sub=value``) are merged over the recipe
    and validated with it. ``evaluate``: periodic evaluation; ``report``: the end-of-run table
    (default: the recipe's ``evaluation.report``).
    """
    from accelerate.utils import set_seed

    from ..training.trainer import Trainer

    recipe = load_distill_recipe(recipe_path, overrides, set_items)
    output_dir = Path(output_dir)
    if resume:
        check_resume(output_dir, recipe)
    set_seed(recipe.training.seed)  # role construction (copies, LoRA, heads) draws from the seeded global RNG
    teacher = load_recipe_teacher(recipe)
    data = open_run_data(teacher, recipe)
    method = build_method(teacher, recipe, data)
    benchmark = run_benchmark(teacher, recipe) if (evaluate or report is not False) else None
    evaluators = [benchmark.evaluator()] if (evaluate and benchmark is not None) else []
    trainer = Trainer(method, recipe.training, output_dir, resume=resume, overwrite=overwrite,
                      run_info=_run_info(recipe, recipe_path), evaluators=evaluators, progress=progress)
    if trainer.accelerator.is_main_process and progress:
        print(f"stepdistill distill: {recipe.method} student of {recipe.teacher.path} ({teacher.family}); {describe_data(data)}", flush=True)
    began = time.perf_counter()
    final = trainer.train()
    minutes = (time.perf_counter() - began) / 60
    out = artefact_dir(method, output_dir)
    if trainer.accelerator.is_main_process:
        metrics = None
        if final:
            metrics = {"model": f"{recipe.method.upper()} student", "steps": method.num_steps, "guidance_scale": method.export_guidance_scale,
                       "samples": recipe.training.num_eval_samples, **{k.removeprefix("eval/"): v for k, v in final.items()}}
        command = "stepdistill distill " + (os.fspath(recipe_path) if not isinstance(recipe_path, Mapping) else "RECIPE")
        export_student(method, method.sampling_network(trainer), out, card=model_card(method, recipe_path), metrics=metrics,
                       metrics_command=f"{command} (evaluation at the last step)" if metrics else None)
        (output_dir / "train_minutes.txt").write_text(f"{minutes:.2f}\n")
        if (recipe.evaluation.report if report is None else report) and benchmark is not None and out.name == "pipeline":
            print(benchmark.report(out, method, output_dir / "report", progress=progress))
    trainer.finish()
    return out


__all__ = ["check_resume", "distill", "export_run_dir", "export_student", "load_recipe_teacher", "open_run_data"]
