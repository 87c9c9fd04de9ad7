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

A staged method (:class:`~.base.StagedDistillation`: progressive distillation, reflow) trains
one student per stage, each with its own Trainer in ``RUN_DIR/<stage>/`` (checkpoints, curve,
resume) exported to ``RUN_DIR/<stage>/pipeline``; the report has a row for every stage.

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
from ..atomic import remove_partial
from ..model_card import portable_path
from .base import Distiller, RunData, StagedDistillation
from .common import has_lora, merge_lora
from .recipe import DistillRecipe
from .registry import load_distill_recipe, method_class
from .run_data import condition_pool, real_samples
from .student import save_adapter_pipeline, save_student_lora, save_student_pipeline

RUN_KIND = "distill"
# keys a resumed run may change: how long it trains and how often it reports
RESUMABLE_CHANGES = ("training.max_steps", "training.log_every", "training.eval_every", "training.checkpoint_every",
                     "training.keep_checkpoints", "training.max_skipped_steps", "evaluation.report", "evaluation.report_samples")


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
    return method_class(recipe.method).build(teacher, recipe, data)


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
    try:  # fields added since the run was made compare by their defaults
        before = to_dict(load_distill_recipe(before))
    except RecipeError:
        pass
    before, now = _flat(before), _flat(to_dict(recipe))
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES]
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
    """``lora/`` for a LoRA student exported as a LoRA file (:attr:`Distiller.exports_lora_file`), ``pipeline/`` otherwise."""
    return Path(run_dir) / ("lora" if method.exports_lora_file else "pipeline")


def model_card(method: Distiller, recipe_path) -> dict[str, Any]:
    """The model card fields of the run's student (paths as the recipe gives them; the card
    makes them relative)."""
    recipe = method.recipe
    sampler = getattr(method, "sampler", None)
    return {
        "title": f"stepdistill {recipe.method.upper()} student ({method.num_steps} step{'s' if method.num_steps > 1 else ''})",
        "base_model": recipe.teacher.path,
        "method": method.description,
        "recipe": None if recipe_path is None or isinstance(recipe_path, Mapping) else os.fspath(recipe_path),
        "license": "other",
        "tags": ["distillation", recipe.method, "few-step"],
        "timesteps": None if sampler is None else [float(t) for t in sampler.timesteps],
        "teacher_guidance_scale": method.card_teacher_guidance_scale,
        "trained_guidance_range": None if method.trained_guidance_range is None else list(method.trained_guidance_range),
        "resolution": [recipe.teacher.height, recipe.teacher.width] if recipe.teacher.height and recipe.teacher.width else None,
    }


def export_student(method: Distiller, network: torch.nn.Module, output: str | os.PathLike, *, card=None,
                   metrics=None, metrics_command=None, overwrite: bool = True) -> Path:
    """Write the trained ``network`` as the run's artefact at ``output`` (see :func:`artefact_dir`)
    and any scheduler variants next to it; returns ``output``."""
    network = method.export_network(network)
    out = Path(output)
    if method.exports_lora_file:
        return save_student_lora(method.teacher, network, method.scheduler, out, num_steps=method.num_steps,
                                 guidance_scale=method.export_guidance_scale, model_card_info=card, metrics=metrics,
                                 metrics_command=metrics_command, overwrite=overwrite)
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
    exactly as the run does at its end. A staged run: every stage's student from its stage's
    latest checkpoint, to ``output_dir/<stage>/<artefact>``; one stage's directory: that stage."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    recipe = load_distill_recipe(info["recipe"])
    teacher = load_recipe_teacher(recipe, info.get("cwd"))
    method = build_method(teacher, recipe, None)
    card = lambda m: model_card(m, info.get("recipe_path"))  # noqa: E731
    if isinstance(method, StagedDistillation) and "stage_index" in info:  # one stage's directory
        stage = method.build_stage(int(info["stage_index"]), None)
        network = _checkpoint_network(stage, run_dir, checkpoint, ema)
        return export_student(stage, network, output_dir, card=card(stage), overwrite=overwrite)
    if isinstance(method, StagedDistillation):
        if checkpoint is not None:
            raise StepdistillError(f"{run_dir} is a staged run ({', '.join(method.stage_names)}): export takes each stage's latest checkpoint")
        out = Path(output_dir)
        for index, name in enumerate(method.stage_names):
            stage = method.build_stage(index, None)
            network = _checkpoint_network(stage, run_dir / name, None, ema)
            export_student(stage, network, artefact_dir(stage, out / name), card=card(stage), overwrite=overwrite)
        return out
    network = _checkpoint_network(method, run_dir, checkpoint, ema)
    return export_student(method, network, output_dir, card=card(method), overwrite=overwrite)


def _checkpoint_network(method: Distiller, run_dir: Path, checkpoint, ema: bool) -> torch.nn.Module:
    from ..training.checkpoint import latest_checkpoint, load_role_weights

    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        raise StepdistillError(f"no complete checkpoint in {run_dir}")
    return load_role_weights(path, "student", method.student, ema=ema and method.export_from_ema)


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
    from ..training.trainer import seed_run

    recipe = load_distill_recipe(recipe_path, overrides, set_items)
    output_dir = Path(output_dir)
    if resume:
        check_resume(output_dir, recipe)
    with seed_run(recipe.training):  # role construction (copies, LoRA, heads) draws from the seeded global RNGs
        return _distill(recipe, recipe_path, output_dir, resume=resume, overwrite=overwrite, progress=progress,
                        evaluate=evaluate, report=report)


def _distill(recipe: DistillRecipe, recipe_path, output_dir: Path, *, resume: bool, overwrite: bool, progress: bool,
             evaluate: bool, report: bool | None) -> Path:
    from ..training.trainer import Trainer, run_state
    from .memory import apply_memory_levers, describe_levers

    teacher = load_recipe_teacher(recipe)
    data = open_run_data(teacher, recipe)
    method = build_method(teacher, recipe, data)
    benchmark = run_benchmark(teacher, recipe) if (evaluate or report is not False) else None
    evaluators = [benchmark.evaluator()] if (evaluate and benchmark is not None) else []
    do_report = (recipe.evaluation.report if report is None else report) and benchmark is not None
    if isinstance(method, StagedDistillation):
        return _distill_stages(method, recipe_path, output_dir, resume=resume, overwrite=overwrite, progress=progress,
                               evaluators=evaluators, benchmark=benchmark if do_report else None, data=data)
    levers = apply_memory_levers(method, run_state().device)  # the recipe's memory: section
    trainer = Trainer(method, recipe.training, output_dir, resume=resume, overwrite=overwrite,
                      run_info={**_run_info(recipe, recipe_path), "memory": levers}, evaluators=evaluators, progress=progress)
    if trainer.accelerator.is_main_process and progress:
        print(f"stepdistill distill: {recipe.method} student of {recipe.teacher.path} ({teacher.family}); {describe_data(data)}", flush=True)
    if trainer.accelerator.is_main_process and progress:
        print(f"stepdistill distill: {describe_levers(levers)}", flush=True)
    out = _train_and_export(method, trainer, output_dir, recipe_path)
    if trainer.accelerator.is_main_process and do_report and out.name == "pipeline":
        report = benchmark.report(out, method, output_dir / "report", progress=progress)
        print(report)
        _card_metrics_from_report(report, {"student": out}, recipe_path)
    trainer.finish()
    return out


def _card_metrics_from_report(report, artefacts: Mapping[str, Path], recipe_path) -> None:
    """Put each student's end-of-run rows (N = evaluation.report_samples) into its model card, in
    place of the periodic evaluation's, so the card states what the printed table says."""
    from ..model_card import update_model_card_metrics

    command = "stepdistill distill " + (portable_path(recipe_path) if not isinstance(recipe_path, Mapping) else "RECIPE")
    for name, directory in artefacts.items():
        rows = report.students.get(name)
        if rows:
            update_model_card_metrics(directory, rows, f"{command} (end-of-run report)", reference=report.reference, feature=report.feature)


def _train_and_export(method: Distiller, trainer, output_dir: Path, recipe_path) -> Path:
    """Train (from wherever the trainer resumed) and export the student to its artefact directory.
    A finished stage met again on ``--resume`` keeps the artefact it already exported."""
    recipe = method.recipe
    finished_before = trainer.start_step >= trainer.config.max_steps
    began = time.perf_counter()
    final = trainer.train()
    minutes = (time.perf_counter() - began) / 60
    out = artefact_dir(method, output_dir)
    if trainer.accelerator.is_main_process and not (finished_before and out.is_dir()):
        remove_partial(output_dir)  # a previous attempt killed mid-export
        metrics = None
        if final:
            metrics = {"model": f"{recipe.method.upper()} student", "steps": method.num_steps, "guidance_scale": method.export_guidance_scale,
                       "num_samples": trainer.config.num_eval_samples, **{k.removeprefix("eval/"): v for k, v in final.items()}}
        command = "stepdistill distill " + (portable_path(recipe_path) if not isinstance(recipe_path, Mapping) else "RECIPE")
        export_student(method, method.sampling_network(trainer), out, card=model_card(method, recipe_path), metrics=metrics,
                       metrics_command=f"{command} (evaluation at the last step)" if metrics else None)
        (output_dir / "train_minutes.txt").write_text(f"{minutes:.2f}\n")
    trainer.accelerator.wait_for_everyone()
    return out


def _distill_stages(staged: StagedDistillation, recipe_path, output_dir: Path, *, resume: bool, overwrite: bool, progress: bool,
                    evaluators, benchmark, data: RunData) -> Path:
    """Train every stage in order, each with its own Trainer in ``output_dir/<stage>``; a stage
    starts from the network the previous stage exported. Returns the last stage's artefact."""
    from accelerate.utils import set_seed

    from ..training.trainer import Trainer, run_state
    from .memory import apply_memory_levers

    recipe = staged.recipe
    state = run_state()
    _claim_staged_dir(output_dir, resume, overwrite, _run_info(recipe, recipe_path), state)
    staged.run_dir = output_dir
    if state.is_main_process and progress:
        print(f"stepdistill distill: {recipe.method} of {recipe.teacher.path} ({staged.teacher.family}) in {len(staged.stage_names)} stages "
              f"({', '.join(staged.stage_names)}); {describe_data(data)}", flush=True)
    previous, students, trainer = None, [], None
    for index, name in enumerate(staged.stage_names):
        set_seed(recipe.training.seed + index)  # what a stage draws while it is built does not depend on the stages before it
        method = staged.build_stage(index, previous)
        stage_dir = output_dir / name
        levers = apply_memory_levers(method, state.device)  # the recipe's memory: section, per stage
        info = {**_run_info(recipe, recipe_path), "stage": name, "stage_index": index, "memory": levers}  # the whole recipe: `export` of a stage directory rebuilds it
        trainer = Trainer(method, staged.stage_training(index), stage_dir, resume=resume, run_info=info, evaluators=evaluators, progress=progress)
        if state.is_main_process and progress:
            print(f"stage {index + 1}/{len(staged.stage_names)} {name}: {method.num_steps}-step student", flush=True)
        out = _train_and_export(method, trainer, stage_dir, recipe_path)
        network = method.sampling_network(trainer)
        if state.is_main_process:
            staged.after_stage(index, method, network, stage_dir)
        state.wait_for_everyone()
        previous = method.export_network(network).eval().requires_grad_(False)
        students.append((name, out, method))
        if index < len(staged.stage_names) - 1:
            del trainer
    if state.is_main_process and benchmark is not None and all(out.name == "pipeline" for _, out, _ in students):
        report = benchmark.report_students(students, output_dir / "report", progress=progress)
        print(report)
        _card_metrics_from_report(report, {name: path for name, path, _ in students}, recipe_path)
    trainer.finish()
    return students[-1][1]


def _claim_staged_dir(output_dir: Path, resume: bool, overwrite: bool, info: dict, state) -> None:
    """The run directory of a staged run: refused when it holds something unless resuming or
    overwriting (as the Trainer guards its own); ``run.json`` at the top names the recipe."""
    from ..errors import OutputDirError

    holds_something = output_dir.exists() and any(output_dir.iterdir())
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output directory {output_dir} exists and is not a directory")
    if holds_something and not (resume or overwrite):
        what = "a run" if (output_dir / "run.json").exists() else "other files"
        raise OutputDirError(f"output directory {output_dir} already holds {what}; pass --resume to continue it or --overwrite to replace it")
    state.wait_for_everyone()
    if state.is_main_process:
        if overwrite and not resume and output_dir.exists():
            import shutil

            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    state.wait_for_everyone()


__all__ = ["check_resume", "distill", "export_run_dir", "export_student", "load_recipe_teacher", "open_run_data"]
