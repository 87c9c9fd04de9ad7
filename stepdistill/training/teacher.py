"""Train a pixel-space teacher on any image data (``stepdistill train-teacher RECIPE``).

The recipe names the data (an image folder, a ``datasets`` directory, or a registered dataset
such as ``digits``) and a ``UNet2DModel`` architecture; the image size, channel count and
classes come from the data:

- unconditional data -> an unconditional UNet, exported as a stock ``DDPMPipeline`` (with the
  recipe's scheduler: ``DDIMScheduler`` by default, so ``pipe(num_inference_steps=K)`` is K DDIM
  steps; any scheduler works in a DDPMPipeline since it only calls ``scheduler.step``);
- class-labelled data (one sub-folder per class, a ClassLabel column) -> ``num_class_embeds =
  classes + 1``: the last index is the null class of classifier-free guidance, trained with
  ``denoising.label_dropout``; exported as stepdistill's ``ClassConditionalPipeline`` (its code
  travels in the directory).

The loss is :class:`~stepdistill.training.denoising.DenoisingMethod`'s (any VP schedule, any
parameterization). Configs: ``configs/digits_teacher.yaml``, ``configs/shapes_teacher.yaml``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

from ..config import EMAConfig, OptimizerConfig, TrainingConfig, bounded, load_recipe, load_yaml, to_dict
from ..errors import RecipeError, StepdistillError
from ..evaluation.benchmarks import EvaluationSection
from ..export import export_info, save_class_conditional_pipeline, save_unconditional_pipeline
from ..model_card import portable_path
from .checkpoint import RUN_FILE, load_trained_model
from .denoising import DenoisingMethod, DenoisingSection
from .trainer import Trainer, seed_run

PIPELINE_SUBDIR = "pipeline"


@dataclass
class TeacherDataSection:
    images: Optional[str] = None  # an image folder, a `datasets` directory, or a registered name ("digits")
    resolution: Optional[int] = bounded(None, ge=1)  # resize + crop to this; None: the images' own size
    center_crop: bool = True
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    split: Optional[str] = None


@dataclass
class UNetSection:
    """``UNet2DModel`` architecture (image size, channels and classes come from the data)."""

    block_out_channels: tuple[int, ...] = bounded((32, 64), ge=1)
    layers_per_block: int = bounded(2, ge=1)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D")
    norm_num_groups: int = bounded(8, ge=1)
    attention_head_dim: Optional[int] = bounded(8, ge=1)


@dataclass
class SchedulerSection:
    """The scheduler the teacher is trained for and exported with."""

    class_name: Literal["DDIMScheduler", "DDPMScheduler"] = "DDIMScheduler"
    num_train_timesteps: int = bounded(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    beta_start: float = bounded(0.0001, gt=0, lt=1)
    beta_end: float = bounded(0.02, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    rescale_betas_zero_snr: bool = False
    clip_sample: bool = False


@dataclass
class TeacherRecipe:
    data: TeacherDataSection = field(default_factory=TeacherDataSection)
    unet: UNetSection = field(default_factory=UNetSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    denoising: DenoisingSection = field(default_factory=DenoisingSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)  # the periodic FD (feature space, reference)


def load_teacher_recipe(path, overrides: Mapping[str, Any] | None = None, set_items: Sequence[str] | None = None) -> TeacherRecipe:
    recipe = load_recipe(path, TeacherRecipe, overrides, set_items)
    if not recipe.data.images:
        raise RecipeError(f"{os.fspath(path)}: data.images is required: an image folder, a `datasets` directory or a registered dataset (--set data.images=DIR)")
    return recipe


def load_any_teacher_recipe(path, overrides: Mapping[str, Any] | None = None, set_items: Sequence[str] | None = None):
    """The recipe of whichever teacher ``path`` trains (pixel, autoencoder or latent), validated."""
    from . import latent_teacher

    kind = latent_teacher.recipe_kind(load_yaml(path))
    if kind == "pixel":
        return load_teacher_recipe(path, overrides, set_items)
    cls = latent_teacher.VAERecipe if kind == "vae" else latent_teacher.LatentTeacherRecipe
    return latent_teacher.load_captioned_recipe(cls, path, overrides, set_items)


def teacher_recipe_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a ``train-teacher`` recipe (``stepdistill schema --kind
    teacher``): an ``autoencoder:`` section makes it an autoencoder recipe, a ``family:`` a latent
    text-to-image teacher, anything else a pixel teacher (:func:`latent_teacher.recipe_kind`)."""
    from ..config import JSON_SCHEMA_DIALECT, json_schema
    from .latent_teacher import LatentTeacherRecipe, VAERecipe

    def branch(cls):
        schema = json_schema(cls)
        del schema["$schema"]
        return schema

    return {"$schema": JSON_SCHEMA_DIALECT, "title": "stepdistill train-teacher recipe",
            "if": {"required": ["autoencoder"]}, "then": branch(VAERecipe),
            "else": {"if": {"required": ["family"]}, "then": branch(LatentTeacherRecipe), "else": branch(TeacherRecipe)}}


def build_unet(section: UNetSection, sample_size: tuple[int, int], channels: int, num_classes: int | None):
    from diffusers import UNet2DModel

    if not (len(section.block_out_channels) == len(section.down_block_types) == len(section.up_block_types)):
        raise RecipeError("unet: block_out_channels, down_block_types and up_block_types must have the same length")
    for channels_ in section.block_out_channels:
        if channels_ % section.norm_num_groups:
            raise RecipeError(f"unet: every block_out_channels must be divisible by norm_num_groups ({section.norm_num_groups})")
    head = section.attention_head_dim
    if head is not None and (section.block_out_channels[-1] < head or section.block_out_channels[-1] % head):
        raise RecipeError(f"unet: attention_head_dim ({head}) must divide the last block_out_channels ({section.block_out_channels[-1]}): "
                          "the mid block (and attention blocks) split their channels into heads of that size")
    factor = 2 ** (len(section.block_out_channels) - 1)
    if sample_size[0] % factor or sample_size[1] % factor:
        raise RecipeError(f"unet: {len(section.block_out_channels)} blocks halve the image {len(section.block_out_channels) - 1} times; "
                          f"the data's {sample_size[0]}x{sample_size[1]} is not divisible by {factor} (set data.resolution)")
    size = sample_size[0] if sample_size[0] == sample_size[1] else tuple(sample_size)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(section.block_out_channels),
        layers_per_block=section.layers_per_block,
        down_block_types=tuple(section.down_block_types),
        up_block_types=tuple(section.up_block_types),
        norm_num_groups=section.norm_num_groups,
        attention_head_dim=section.attention_head_dim,
        num_class_embeds=None if num_classes is None else num_classes + 1,  # last index: the null class of CFG
    )


def build_scheduler(section: SchedulerSection):
    import diffusers

    kwargs = {k: v for k, v in to_dict(section).items() if k != "class_name"}
    if section.class_name == "DDIMScheduler":
        kwargs["set_alpha_to_one"] = True
    return getattr(diffusers, section.class_name)(**kwargs)


def teacher_card(dataset) -> dict[str, Any]:
    """Model card fields: the dataset's own (a registered dataset may carry ``card``), else generic."""
    card = dict(getattr(dataset, "card", None) or {})
    card.setdefault("title", "stepdistill pixel teacher")
    card.setdefault("description", f"UNet2DModel trained with stepdistill on {dataset.summary()}.")
    card.setdefault("method", "denoising diffusion training")
    card.setdefault("dataset", getattr(dataset, "source", None))
    card.setdefault("license", "other")
    card.setdefault("tags", ["teacher", "class-conditional" if dataset.kind == "class" else "unconditional"])
    if dataset.kind == "class":
        card.setdefault("class_names", list(dataset.class_names))
    return card


def train_teacher(
    recipe_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    overrides: Mapping[str, Any] | None = None,
    set_items: Sequence[str] | None = None,
    progress: bool = True,
    evaluate: bool = True,
) -> Path:
    """Train a teacher from a recipe: a pixel UNet (exported to ``output_dir/pipeline``), or, for
    latent text-to-image teachers (:mod:`stepdistill.training.latent_teacher`), the autoencoder
    (``autoencoder:`` recipes, exported to ``output_dir/vae``) or the denoiser (``family:``
    recipes, the family's stock pipeline in ``output_dir/pipeline``)."""
    from ..data import open_images
    from . import latent_teacher

    kind = latent_teacher.recipe_kind(load_yaml(recipe_path))
    if kind != "pixel":
        train = latent_teacher.train_autoencoder if kind == "vae" else latent_teacher.train_latent_teacher
        return train(recipe_path, output_dir, resume=resume, overwrite=overwrite, overrides=overrides, set_items=set_items, progress=progress)

    recipe = load_teacher_recipe(recipe_path, overrides, set_items)
    d = recipe.data
    resolution = (d.resolution, d.resolution) if d.resolution else None
    dataset = open_images(d.images, resolution=resolution, center_crop=d.center_crop, image_column=d.image_column,
                          label_column=d.label_column, split=d.split)
    if dataset.kind == "text":
        raise RecipeError(f"{d.images} holds captions (text-to-image): train a latent text-to-image teacher with a `family:` recipe "
                          "(configs/t2i_sd_teacher.yaml, configs/t2i_flow_teacher.yaml; docs/t2i.md)")
    if progress:
        print(f"stepdistill train-teacher: {dataset.summary()}", flush=True)
    with seed_run(recipe.training):  # the initial weights are part of the run's determinism
        return _train_teacher(recipe, recipe_path, output_dir, dataset, resume=resume, overwrite=overwrite, progress=progress,
                              evaluate=evaluate)


def _train_teacher(recipe: TeacherRecipe, recipe_path, output_dir, dataset, *, resume: bool, overwrite: bool, progress: bool,
                   evaluate: bool) -> Path:
    d = recipe.data
    unet = build_unet(recipe.unet, (dataset.height, dataset.width), dataset.channels, dataset.num_classes if dataset.kind == "class" else None)
    scheduler = build_scheduler(recipe.scheduler)
    method = DenoisingMethod(unet, scheduler, dataset, optimizer=recipe.optimizer, ema=recipe.ema,
                             label_dropout=recipe.denoising.label_dropout, eval_inference_steps=recipe.denoising.eval_inference_steps)
    card = teacher_card(dataset)
    evaluators = []
    if evaluate:
        from ..evaluation.benchmarks import benchmark_for

        benchmark = benchmark_for(recipe.evaluation, d.images, "", dataset.channels, (dataset.height, dataset.width))
        evaluators = [benchmark.evaluator()] if benchmark is not None else []
    trainer = Trainer(method, recipe.training, output_dir, resume=resume, overwrite=overwrite,
                      run_info={"kind": "teacher", "recipe": to_dict(recipe), "recipe_path": os.fspath(recipe_path), "cwd": os.getcwd(),
                                "export": export_info(scheduler, role="unet", num_inference_steps=50, model_card_info=card,
                                                      pipeline_class=None if dataset.kind == "class" else "DDPMPipeline")},
                      evaluators=evaluators, progress=progress)
    final = trainer.train()
    pipeline_dir = Path(output_dir) / PIPELINE_SUBDIR
    if trainer.accelerator.is_main_process:
        ema_unet = load_trained_model(output_dir, role="unet", ema=True)
        metrics = None
        if final:
            metrics = {"model": "teacher (EMA)", "steps": recipe.denoising.eval_inference_steps, "guidance_scale": 1.0,
                       "num_samples": recipe.training.num_eval_samples, **{k.removeprefix("eval/"): v for k, v in final.items()}}
        command = f"stepdistill train-teacher {portable_path(recipe_path)} (evaluation at the last step)" if metrics else None
        common = dict(num_inference_steps=50, metrics=metrics, metrics_command=command, model_card_info=card, overwrite=True)
        if dataset.kind == "class":
            save_class_conditional_pipeline(ema_unet, scheduler, pipeline_dir, **common)
        else:
            save_unconditional_pipeline(ema_unet, scheduler, pipeline_dir, pipeline_class="DDPMPipeline", **common)
    trainer.finish()
    return pipeline_dir


def export_run(
    run_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    ema: bool = True,
    overwrite: bool = False,
    checkpoint: str | os.PathLike | None = None,
) -> Path:
    """Export a teacher-training run's (EMA) model from its latest checkpoint (or ``checkpoint``) as a
    pipeline directory: class-conditional UNets as ``ClassConditionalPipeline``, others as the
    recorded stock pipeline (``DDPMPipeline`` / ``DDIMPipeline``). Distillation runs are exported
    by :func:`stepdistill.distillers.run.export_run_dir` (``stepdistill export`` picks)."""
    import diffusers

    run_file = Path(run_dir) / RUN_FILE
    if not run_file.is_file():
        raise StepdistillError(f"{run_dir} is not a training run directory ({RUN_FILE} missing)")
    run = json.loads(run_file.read_text())
    if run.get("kind") == "latent-teacher":
        from . import latent_teacher

        return latent_teacher.export_run(run_dir, output_dir, ema=ema, overwrite=overwrite, checkpoint=checkpoint)
    info = run.get("export")
    if not info:
        raise StepdistillError(f"run {run_dir} records no export settings ('export' in {RUN_FILE}; see stepdistill.export.export_info)")
    scheduler_config = dict(info["scheduler"])
    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", ""), None)
    if scheduler_class is None:
        raise StepdistillError(f"run {run_dir} names an unknown scheduler class {scheduler_config.get('_class_name')!r}")
    scheduler = scheduler_class.from_config(scheduler_config)
    model = load_trained_model(run_dir, info.get("role", "unet"), ema=ema, checkpoint=checkpoint)
    common = dict(
        num_inference_steps=info.get("num_inference_steps"),
        model_card_info=info.get("model_card"),
        overwrite=overwrite,
    )
    if getattr(model.config, "num_class_embeds", None) is None:
        return save_unconditional_pipeline(model, scheduler, output_dir, pipeline_class=info.get("pipeline_class"), **common)
    return save_class_conditional_pipeline(model, scheduler, output_dir, guidance_scale=info.get("guidance_scale", 1.0), **common)


__all__ = ["TeacherRecipe", "export_run", "load_any_teacher_recipe", "teacher_recipe_schema", "build_scheduler", "build_unet", "load_teacher_recipe", "train_teacher"]
