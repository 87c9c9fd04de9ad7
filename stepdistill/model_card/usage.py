"""What an exported directory is: its pipeline class, task, scheduler and defaults (read from the files the export wrote)."""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StepdistillError

CARD_NAME = "README.md"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
OUR_PIPELINES = {"ClassConditionalPipeline": "class-conditional", "HybridClassConditionalPipeline": "class-conditional"}  # pipeline code shipped in the directory
# The Hub's pipeline tags (its task list) have no class-conditional task: class-conditional
# models (DiT on the Hub too) are filed under unconditional-image-generation and tagged.
PIPELINE_TAGS = {"text-to-image": "text-to-image", "class-conditional": "unconditional-image-generation",
                 "unconditional": "unconditional-image-generation"}
EXAMPLE_PROMPT = "a photo of a cat"



@dataclass
class PipelineUsage:
    """How an exported directory is called, as read from its files by :func:`read_usage`."""

    pipeline_class: str  # the pipeline's class ("StableDiffusionPipeline"); for a LoRA file, its base pipeline's
    kind: str  # "text-to-image", "class-conditional" or "unconditional"
    num_inference_steps: int
    guidance_scale: float | None  # None: the pipeline takes none (unconditional)
    scheduler_class: str
    trust_remote_code: bool = False  # the directory carries pipeline / model code
    lora: bool = False  # a LoRA file for the base pipeline ``pipeline_class``
    num_classes: int | None = None
    guidance_embedding: bool = False  # guidance_scale feeds a w-embedding (LCM / w-conditioned students)
    embedded_guidance: bool = False  # Flux: guidance_scale is FLUX.1-dev's distilled guidance input, not CFG
    timesteps: list[float] | None = None  # what scheduler.set_timesteps(num_inference_steps) gives (None: depends on the image size)
    trained_guidance_range: list[float] | None = None  # a w-conditioned ClassConditionalPipeline's, from model_index.json

    @property
    def pipeline_tag(self) -> str:
        return PIPELINE_TAGS[self.kind]


# -- reading an exported directory ------------------------------------------------------------
def read_usage(
    directory: str | os.PathLike,
    num_inference_steps: int,
    guidance_scale: float | None = 1.0,
    base_pipeline: str | None = None,
) -> PipelineUsage:
    """How to call the pipeline (or, with ``base_pipeline``, the LoRA file) in ``directory``.

    ``num_inference_steps`` / ``guidance_scale``: what the model was exported to sample with.
    ``base_pipeline``: the class name of the pipeline a LoRA directory is loaded into.
    """
    directory = Path(directory)
    scheduler_class = _read_json(directory / "scheduler" / "scheduler_config.json").get("_class_name")
    if not scheduler_class:
        raise StepdistillError(f"{directory} has no scheduler/scheduler_config.json naming its scheduler class")
    if base_pipeline is not None:
        if not (directory / LORA_WEIGHTS).is_file():
            raise StepdistillError(f"{directory} has no {LORA_WEIGHTS}: not a LoRA directory")
        pipeline_class, custom, components, index = base_pipeline, False, {}, {}
    else:
        index = _read_json(directory / "model_index.json")
        name = index.get("_class_name")
        custom = isinstance(name, list) or any(
            isinstance(v, list) and len(v) == 2 and v[0] not in (None, "diffusers", "transformers") for v in index.values()
        )
        pipeline_class = name[-1] if isinstance(name, list) else name
        components = {k: _read_json(directory / k / "config.json") for k in ("unet", "transformer") if (directory / k / "config.json").is_file()}
    kind = pipeline_kind(pipeline_class)
    denoiser = next(iter(components.values()), {})
    num_classes = None
    if kind == "class-conditional":
        if denoiser.get("num_class_embeds") is not None:
            num_classes = int(denoiser["num_class_embeds"]) - 1  # the last embedding is the null class of CFG
        elif denoiser.get("num_embeds_ada_norm") is not None:
            num_classes = int(denoiser["num_embeds_ada_norm"])  # DiT: the null class is the extra row past the labels
    return PipelineUsage(
        pipeline_class=pipeline_class,
        kind=kind,
        num_inference_steps=int(num_inference_steps),
        guidance_scale=None if kind == "unconditional" else float(1.0 if guidance_scale is None else guidance_scale),
        scheduler_class=scheduler_class,
        trust_remote_code=custom,
        lora=base_pipeline is not None,
        num_classes=num_classes,
        guidance_embedding=denoiser.get("time_cond_proj_dim") is not None,
        # FluxPipeline's guidance_scale is never CFG (that is true_cfg_scale): a LoRA file's transformer config is the base's
        embedded_guidance=bool(denoiser.get("guidance_embeds")) or pipeline_class == "FluxPipeline",
        timesteps=_sampling_timesteps(directory, scheduler_class, num_inference_steps),
        trained_guidance_range=index.get("trained_guidance_range"),
    )


def pipeline_kind(pipeline_class: str) -> str:
    """"text-to-image", "class-conditional" or "unconditional", from the pipeline's ``__call__``."""
    if pipeline_class in OUR_PIPELINES:
        return OUR_PIPELINES[pipeline_class]
    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    if cls is None:
        raise StepdistillError(f"cannot write a model card for pipeline class {pipeline_class!r}: not a diffusers pipeline")
    parameters = inspect.signature(cls.__call__).parameters
    if "prompt" in parameters:
        return "text-to-image"
    return "class-conditional" if "class_labels" in parameters else "unconditional"


def _sampling_timesteps(directory: Path, scheduler_class: str, steps: int) -> list[float] | None:
    """The timesteps the exported scheduler samples at; None where they depend on the image size
    (Flux-style dynamic shifting needs ``mu``)."""
    import diffusers

    cls = getattr(diffusers, scheduler_class, None)
    if cls is None:
        return None
    scheduler = cls.from_pretrained(directory, subfolder="scheduler")
    try:
        scheduler.set_timesteps(steps, device="cpu")
    except (ValueError, TypeError):
        return None
    return [round(float(t), 3) for t in scheduler.timesteps]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StepdistillError(f"cannot write a model card: {path} is missing") from None
    except (OSError, ValueError) as exc:
        raise StepdistillError(f"cannot read {path}: {exc}") from None
