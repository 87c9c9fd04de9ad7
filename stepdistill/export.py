"""Export students and teachers as drop-in diffusers pipeline directories.

- :func:`save_class_conditional_pipeline`: our ``ClassConditionalPipeline`` (its code travels
  in the directory), loaded with ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)``.
- :func:`save_unconditional_pipeline`: a stock ``DDIMPipeline`` / ``DDPMPipeline`` directory, for
  unconditional teachers and their students.
- :func:`export_info`: the settings a teacher-training run records so that
  ``stepdistill export RUN_DIR OUTPUT_DIR`` (:func:`stepdistill.training.teacher.export_run`)
  writes either of the above later.

Both write atomically (the directory is built next to ``output_dir`` and renamed into place),
refuse a non-empty ``output_dir`` unless ``overwrite=True``, and write a model card rendered from
the files they wrote (:mod:`stepdistill.model_card`).

A few-step student is trained on the timesteps its exported scheduler produces
(:func:`stepdistill.sampling.make_student_scheduler` builds it from the teacher's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from diffusers import DDIMScheduler

from .atomic import atomic_directory
from .errors import StepdistillError
from .model_card import Metrics, ModelCardInfo, portable_path, write_model_card

PIPELINE_FILE = "class_conditional_pipeline.py"
GUIDANCE_UNET_FILE = "guidance_unet_2d.py"  # the w-conditioned UNet2DModel, a custom component in unet/
PIPELINE_SOURCE = Path(__file__).resolve().parent.parent / "pipelines" / PIPELINE_FILE
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name (load_lora_weights)


# -- pipeline directories -------------------------------------------------------------------------
def save_class_conditional_pipeline(
    unet,
    scheduler,
    output_dir: str | os.PathLike,
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float = 1.0,
    trained_guidance_range: tuple[float, float] | None = None,
    lora: tuple[Mapping[str, torch.Tensor], Mapping[str, Any]] | None = None,
    metrics: Metrics | None = None,
    metrics_command: str | None = None,
    model_card_info: ModelCardInfo | Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``unet`` + ``scheduler`` as a ``ClassConditionalPipeline`` directory that loads with
    ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` (pipeline code inside).

    ``num_inference_steps`` / ``guidance_scale`` become the pipeline's defaults and the model
    card's usage (``num_inference_steps`` defaults to 50, the teacher setting). ``metrics``
    (rows of measured numbers) and ``metrics_command`` (the command that measured them) go into
    the model card as given. ``trained_guidance_range``: a w-conditioned student's training range of
    w (the pipeline warns outside it). ``lora``: (peft state dict, LoraConfig fields) of adapters of
    ``unet`` written next to it as a guidance adapter (:func:`write_lora_file`), which the pipeline's
    ``load_lora_weights(dir)`` puts on (``guidance_scale`` then drives them) and ``disable_lora()`` off.
    """
    if getattr(unet.config, "num_class_embeds", None) is None:
        raise StepdistillError("this UNet has no class embedding (num_class_embeds is None): use save_unconditional_pipeline")
    steps = _check_steps(scheduler, 50 if num_inference_steps is None else num_inference_steps)

    # A w-conditioned student (GuidanceUNet2DModel) travels with its class: diffusers loads
    # unet/guidance_unet_2d.py as a custom component under trust_remote_code.
    custom_unet = getattr(unet.config, "time_cond_proj_dim", None) is not None
    unet_entry = [Path(GUIDANCE_UNET_FILE).stem, type(unet).__name__] if custom_unet else ["diffusers", type(unet).__name__]

    def build(tmp: Path) -> None:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        shutil.copyfile(pipeline_source(), tmp / PIPELINE_FILE)
        if custom_unet:
            shutil.copyfile(pipeline_source(GUIDANCE_UNET_FILE), tmp / "unet" / GUIDANCE_UNET_FILE)
        if lora is not None:
            write_lora_file(tmp / LORA_WEIGHT_NAME, *lora, prefix="unet", guidance_adapter=True)
        index = {
            "_class_name": [Path(PIPELINE_FILE).stem, "ClassConditionalPipeline"],
            "_diffusers_version": diffusers_version(),
            "default_guidance_scale": float(guidance_scale),
            "default_num_inference_steps": steps,
            "trained_guidance_range": None if trained_guidance_range is None else [float(w) for w in trained_guidance_range],
            "scheduler": ["diffusers", type(scheduler).__name__],
            "unet": unet_entry,
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    return write_pipeline_directory(output_dir, overwrite, build, num_inference_steps=steps, guidance_scale=float(guidance_scale),
                            model_card_info=model_card_info, metrics=metrics, metrics_command=metrics_command)


def save_unconditional_pipeline(
    unet,
    scheduler,
    output_dir: str | os.PathLike,
    *,
    num_inference_steps: int | None = None,
    pipeline_class: str | None = None,
    metrics: Metrics | None = None,
    metrics_command: str | None = None,
    model_card_info: ModelCardInfo | Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an unconditional ``unet`` + ``scheduler`` as a stock ``DDIMPipeline`` (a
    ``DDIMScheduler``) or ``DDPMPipeline`` (any other scheduler: DDPMPipeline only calls
    ``scheduler.step``, so an LCM / TCD / DDPM scheduler samples exactly the trained timesteps;
    ``DDIMPipeline`` would convert it to DDIM). ``pipeline_class`` forces one of the two.
    ``num_inference_steps`` goes into the model card's usage (the stock pipelines have no
    per-directory default).
    """
    import diffusers

    if getattr(unet.config, "num_class_embeds", None) is not None:
        raise StepdistillError("this UNet is class-conditional (num_class_embeds is set): use save_class_conditional_pipeline")
    pipeline_class = pipeline_class or ("DDIMPipeline" if type(scheduler) is DDIMScheduler else "DDPMPipeline")
    if pipeline_class == "DDIMPipeline" and type(scheduler) is not DDIMScheduler:
        raise StepdistillError(
            f"a DDIMPipeline samples with DDIMScheduler; got {type(scheduler).__name__} (use a DDPMPipeline, "
            "or build the student's scheduler with make_student_scheduler)"
        )
    if pipeline_class not in ("DDIMPipeline", "DDPMPipeline"):
        raise StepdistillError(f"unconditional pipelines are exported as DDIMPipeline or DDPMPipeline; got {pipeline_class!r}")
    steps = _check_steps(scheduler, 50 if num_inference_steps is None else num_inference_steps)

    def build(tmp: Path) -> None:
        getattr(diffusers, pipeline_class)(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)

    return write_pipeline_directory(output_dir, overwrite, build, num_inference_steps=steps, guidance_scale=None,
                            model_card_info=model_card_info, metrics=metrics, metrics_command=metrics_command)


# -- training runs ------------------------------------------------------------------------------
def export_info(
    scheduler,
    *,
    role: str = "unet",
    num_inference_steps: int | None = None,
    guidance_scale: float = 1.0,
    pipeline_class: str | None = None,
    model_card_info: ModelCardInfo | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """How :func:`export_run` exports a run, as JSON: trainers store it as ``run_info["export"]``
    (it lands in ``run.json``). ``scheduler`` is the one the model samples with (for a student,
    :func:`make_student_scheduler`'s); ``role`` is the trained role to export."""
    config = json.loads(json.dumps(dict(scheduler.config), default=list))
    config["_class_name"] = type(scheduler).__name__
    return {
        "role": role,
        "scheduler": config,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": float(guidance_scale),
        "pipeline_class": pipeline_class,  # unconditional models: DDIMPipeline / DDPMPipeline (None: by scheduler)
        "model_card": dataclasses.asdict(ModelCardInfo.coerce(model_card_info)),
    }


def write_lora_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
                    prefix: str = "unet", guidance_adapter: bool = False) -> None:
    """A LoRA in diffusers' file format: keys ``<prefix>.<module>.lora_A.weight`` and the peft
    ``LoraConfig`` fields in the safetensors metadata (``lora_adapter_metadata``, as diffusers'
    ``save_lora_weights`` writes it). ``guidance_adapter``: the metadata also says the adapter's
    strength is ``guidance_scale - 1`` (adapter guidance distillation)."""
    from safetensors.torch import save_file

    tensors = {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, sort_keys=True)}
    if guidance_adapter:
        metadata["guidance_adapter"] = "guidance_scale - 1"
    save_file(tensors, os.fspath(path), metadata=metadata)


# -- helpers ------------------------------------------------------------------------------------
def _check_steps(scheduler, steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise StepdistillError(f"num_inference_steps must be a positive integer; got {steps!r}")
    train_steps = scheduler.config.get("num_train_timesteps")
    if train_steps is not None and steps > train_steps:
        raise StepdistillError(f"num_inference_steps={steps} exceeds the scheduler's {train_steps} training timesteps")
    return steps


def write_pipeline_directory(
    output_dir: str | os.PathLike,
    overwrite: bool,
    build: Callable[[Path], None],
    *,
    num_inference_steps: int,
    guidance_scale: float | None,
    model_card_info=None,
    metrics=None,
    metrics_command: str | None = None,
    base_pipeline: str | None = None,
) -> Path:
    """Build the directory in a temporary sibling, write its model card from what ``build`` wrote
    (``base_pipeline``: a LoRA directory's pipeline class), then rename it into place."""
    out = Path(output_dir).absolute()
    info = ModelCardInfo.coerce(model_card_info)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        build(tmp)
        write_model_card(tmp, info, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         base_pipeline=base_pipeline, model_id=portable_path(out), metrics=metrics, command=metrics_command)
    return out


def pipeline_source(name: str = PIPELINE_FILE) -> Path:
    """A shipped file of ``pipelines/``, from an installed wheel or a source checkout."""
    try:
        from . import pipelines as installed  # wheel / editable install: stepdistill.pipelines

        candidate = Path(installed.__file__).parent / name
        if candidate.exists():
            return candidate
    except ImportError:
        pass
    if (PIPELINE_SOURCE.parent / name).exists():
        return PIPELINE_SOURCE.parent / name
    raise StepdistillError(f"cannot find {name}: reinstall stepdistill (it ships as stepdistill.pipelines)")


def diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


__all__ = [
    "export_info",
    "save_class_conditional_pipeline",
    "save_unconditional_pipeline",
    "write_lora_file",
]
