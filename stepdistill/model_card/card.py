"""Rendering, writing and updating a card: the front matter, the sections and the usage snippet."""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import StepdistillError
from .metrics import METRICS_END, METRICS_START, Metrics, eval_results, metric_rows, metrics_section
from .paths import portable_path
from .usage import CARD_NAME, EXAMPLE_PROMPT, LORA_WEIGHTS, PIPELINE_TAGS, PipelineUsage, read_usage

@dataclass
class ModelCardInfo:
    """What the exporter knows about a model beyond the files; every field is optional.

    ``base_model`` and ``recipe`` are written as :func:`portable_path` makes them. ``model_id``
    is what the usage snippet passes to ``from_pretrained`` (a Hub repo id); by default the
    exported directory as :func:`portable_path` gives it. ``timesteps``: the timesteps a student
    was trained at (else the card shows the ones its scheduler samples). ``teacher_guidance_scale``:
    the teacher CFG a student was distilled with; ``trained_guidance_range``: the w range of a
    w-conditioned student. ``resolution``: ``[height, width]`` the model was trained at (the
    snippet passes it to pipelines that take ``height`` / ``width``).
    """

    title: str | None = None
    description: str | None = None
    base_model: str | None = None
    method: str | None = None
    recipe: str | None = None
    dataset: str | None = None
    license: str | None = None
    model_id: str | None = None
    tags: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    timesteps: list[float] | None = None
    teacher_guidance_scale: float | None = None
    trained_guidance_range: list[float] | None = None
    resolution: list[int] | None = None

    @classmethod
    def coerce(cls, info: "ModelCardInfo | Mapping[str, Any] | None") -> "ModelCardInfo":
        if info is None:
            return cls()
        if isinstance(info, cls):
            return info
        if not isinstance(info, Mapping):
            raise StepdistillError(f"model_card_info must be a ModelCardInfo or a dict; got {type(info).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(info) - known)
        if unknown:
            raise StepdistillError(f"unknown model_card_info key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**dict(info))


# -- rendering --------------------------------------------------------------------------------------
TEMPLATE = """---
{{ card_data }}
---

{{ body }}
"""


def render_model_card(
    usage: PipelineUsage,
    info: ModelCardInfo,
    model_id: str,
    metrics: Metrics | None = None,
    command: str | None = None,
    *,
    reference: str | None = None,
    feature: str | None = None,
):
    """The card (a :class:`huggingface_hub.ModelCard`) of an exported directory."""
    from huggingface_hub import ModelCard, ModelCardData

    info = ModelCardInfo.coerce(info)
    title = info.title or _default_title(usage)
    rows = metric_rows(metrics)
    tags = ["diffusers", "stepdistill", usage.kind] + (["lora"] if usage.lora else []) + [t for t in info.tags if t]
    results = eval_results(rows, usage.pipeline_tag, reference, feature)
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=usage.pipeline_tag,
        base_model=portable_path(info.base_model),
        license=info.license,
        datasets=[_relative_text(info.dataset)] if info.dataset else None,
        tags=list(dict.fromkeys(tags)),
        model_name=title if results else None,  # the model-index's name
        eval_results=results or None,
    )
    body = "\n".join(
        [f"# {title}", "", *_description(usage, info), "## Usage", "", "```python", usage_snippet(usage, model_id, info), "```", "",
         *_usage_notes(usage), metrics_section(rows, command, reference=reference, feature=feature), ""]
    )
    return ModelCard.from_template(data, template_str=TEMPLATE, body=body)


def write_model_card(
    directory: str | os.PathLike,
    info: ModelCardInfo | Mapping[str, Any] | None = None,
    *,
    num_inference_steps: int,
    guidance_scale: float | None = 1.0,
    base_pipeline: str | None = None,
    model_id: str | None = None,
    metrics: Metrics | None = None,
    command: str | None = None,
) -> Path:
    """Write ``directory/README.md`` for the pipeline (or LoRA file, with ``base_pipeline``) in it.

    ``model_id``: what the snippet loads when ``info.model_id`` is not set (exporters pass the
    final directory through :func:`portable_path`; default: ``directory`` itself that way).
    """
    info = ModelCardInfo.coerce(info)
    usage = read_usage(directory, num_inference_steps, guidance_scale, base_pipeline)
    if usage.lora and not info.base_model:
        raise StepdistillError("a LoRA file's model card needs base_model (the pipeline it is loaded into)")
    model_id = info.model_id or model_id or portable_path(directory)
    card = render_model_card(usage, info, model_id, metrics, command)
    path = Path(directory) / CARD_NAME
    card.save(path)
    return path


def update_model_card_metrics(
    directory: str | os.PathLike,
    metrics: Metrics,
    command: str | None = None,
    *,
    reference: str | None = None,
    feature: str | None = None,
) -> Path:
    """Replace the measured-metrics section of ``directory/README.md`` and its ``model-index``
    (the rest stays as is). ``metrics`` (rows measured on this model) replaces any earlier table;
    ``command`` is the exact command that measured them; ``reference`` / ``feature``: the real
    images and the feature space FD / KID were measured against. A card without the section
    (written by hand) gets it appended."""
    from huggingface_hub import ModelCard

    path = Path(directory) / CARD_NAME
    if not path.is_file():
        raise StepdistillError(f"no model card at {path}: export the directory with stepdistill first")
    rows = metric_rows(metrics)
    card = ModelCard.load(path)
    section = metrics_section(rows, command, reference=reference, feature=feature)
    text = card.text
    start, end = text.find(METRICS_START), text.find(METRICS_END)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(METRICS_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    card.text = text
    results = eval_results(rows, card.data.pipeline_tag or PIPELINE_TAGS["unconditional"], reference, feature)
    card.data.eval_results = results or None
    card.data.model_name = (card.data.model_name or _first_heading(text) or Path(directory).name) if results else None
    card.save(path)
    return path


def read_front_matter(directory: str | os.PathLike) -> dict[str, Any]:
    """The front matter of ``directory/README.md`` as a dict, parsed (and checked) by
    huggingface_hub's :meth:`ModelCard.load`."""
    from huggingface_hub import ModelCard

    path = Path(directory) / CARD_NAME
    if not path.is_file():
        raise StepdistillError(f"no model card at {path}")
    return ModelCard.load(path, ignore_metadata_errors=False).data.to_dict()


# -- sections ---------------------------------------------------------------------------------------
def _default_title(usage: PipelineUsage) -> str:
    if usage.lora:
        return f"Few-step LoRA for {usage.pipeline_class}"
    return {"text-to-image": "Few-step text-to-image model", "class-conditional": "Few-step class-conditional diffusion model",
            "unconditional": "Few-step diffusion model"}[usage.kind]


def _description(usage: PipelineUsage, info: ModelCardInfo) -> list[str]:
    lines = [_relative_text(info.description), ""] if info.description else []
    if usage.lora:
        what = (f"LoRA weights (`{LORA_WEIGHTS}`, diffusers format) for a stock `{usage.pipeline_class}`, loaded with "
                "`load_lora_weights`, plus the scheduler they were trained for (`scheduler/`)")
    elif usage.trust_remote_code:
        what = f"`{usage.pipeline_class}`; its code ships in this directory, hence `trust_remote_code=True`"
    else:
        what = f"stock diffusers `{usage.pipeline_class}` (no `trust_remote_code`)"
    facts = [f"- **Pipeline**: {what}.", f"- **Task**: {_task(usage, info)}."]
    if info.base_model:
        local = os.path.isabs(info.base_model) or os.path.exists(info.base_model)
        facts.append(f"- **Base model**: `{portable_path(info.base_model)}`"
                     + (" (a local path: put the teacher's Hub id in `base_model` before uploading)." if local else "."))
    if info.method:
        facts.append(f"- **Method**: {info.method}" + (f", recipe `{portable_path(info.recipe)}`." if info.recipe else "."))
    if info.dataset:
        facts.append(f"- **Training data**: {_relative_text(info.dataset)}.")
    facts.append(f"- **Sampling**: {_sampling(usage, info)}.")
    if usage.guidance_scale is not None:
        facts.append(f"- **Guidance**: {_guidance(usage, info)}.")
    if usage.kind == "text-to-image":
        facts.append(f"- **Negative prompts**: {_negative_prompt(usage)}.")
    return lines + facts + [""]


def _task(usage: PipelineUsage, info: ModelCardInfo) -> str:
    if usage.kind == "text-to-image":
        return "text-to-image"
    if usage.kind == "unconditional":
        return "unconditional image generation"
    text = "class-conditional image generation"
    if usage.num_classes is not None:
        text += f", class labels in `[0, {usage.num_classes})` (label {usage.num_classes} is the null class of classifier-free guidance)"
    if info.class_names:
        text += "; classes " + ", ".join(f"{i}: {name}" for i, name in enumerate(info.class_names))
    return text


def _sampling(usage: PipelineUsage, info: ModelCardInfo) -> str:
    steps = "1 step" if usage.num_inference_steps == 1 else f"{usage.num_inference_steps} steps"
    text = f"{steps} with `{usage.scheduler_class}`"
    if info.timesteps is not None:
        text += f", trained at timesteps {_numbers(info.timesteps)}"
    elif usage.timesteps is not None:
        text += f", at timesteps {_numbers(usage.timesteps)}"
    else:
        text += " (its timesteps shift with the image size, as the stock pipeline sets them)"
    if info.resolution:
        text += f"; trained at {info.resolution[0]}x{info.resolution[1]} pixels"
    return text


def _guidance(usage: PipelineUsage, info: ModelCardInfo) -> str:
    w = f"`guidance_scale={usage.guidance_scale:g}`"
    if usage.embedded_guidance:
        text = f"{w} is the embedded (distilled) guidance input of FLUX.1-dev-style transformers, not classifier-free guidance"
    elif usage.guidance_embedding:
        text = f"{w} feeds the model's w-embedding: one pass per step, no classifier-free guidance pass"
        trained = info.trained_guidance_range or usage.trained_guidance_range
        if trained:
            lo, hi = trained
            text += f"; trained for w in [{lo:g}, {hi:g}]"
    elif usage.guidance_scale <= 1:
        text = f"{w}: no classifier-free guidance pass"
    else:
        text = f"{w}: classifier-free guidance `uncond + w (cond - uncond)`, two passes per step"
    if info.teacher_guidance_scale is not None and info.teacher_guidance_scale != 1 and not usage.guidance_embedding:
        text += f"; the teacher's guidance w = {info.teacher_guidance_scale:g} was distilled into the weights"
    return text


def _negative_prompt(usage: PipelineUsage) -> str:
    """What ``negative_prompt`` does in the stock pipeline with this directory's settings: it
    replaces the empty prompt of CFG's unconditional pass, so it acts only where that pass runs."""
    if usage.embedded_guidance:
        return ("`guidance_scale` is not CFG here; `negative_prompt` takes effect with `true_cfg_scale > 1` "
                "(FluxPipeline's true CFG, a second pass per step), which the student was not trained for")
    if usage.guidance_embedding:
        return ("not supported: the stock pipeline ignores `negative_prompt` because guidance is a w-embedding "
                "input, with no unconditional pass for a negative prompt to replace")
    if usage.guidance_scale is not None and usage.guidance_scale > 1:
        return "`negative_prompt` replaces the empty prompt of the classifier-free guidance pass"
    return ("ignored at the default `guidance_scale` (guidance is baked into the weights, so no unconditional pass runs); "
            "with `guidance_scale > 1` the pipeline adds a CFG pass against `negative_prompt` on top of the distilled "
            "guidance, which the student was not trained for")


def _usage_notes(usage: PipelineUsage) -> list[str]:
    """What a user of the stock pipeline must know beyond the snippet."""
    if usage.trust_remote_code:
        return [f"Calls without `num_inference_steps` / `guidance_scale` use this directory's defaults "
                f"({usage.num_inference_steps} / {usage.guidance_scale:g}).", ""]
    import diffusers

    parameters = inspect.signature(getattr(diffusers, usage.pipeline_class).__call__).parameters
    names = ["num_inference_steps"] + (["guidance_scale"] if usage.guidance_scale is not None else [])
    defaults = ", ".join(f"`{n}={parameters[n].default!r}`" for n in names if n in parameters and parameters[n].default is not inspect.Parameter.empty)
    note = f"Without these arguments the stock `{usage.pipeline_class}` samples with its own defaults ({defaults}), not this model's."
    if usage.lora:
        note = f"The LoRA was trained for `{usage.scheduler_class}`: keep the scheduler line. " + note
    return [note, ""]


def usage_snippet(usage: PipelineUsage, model_id: str, info: ModelCardInfo | None = None) -> str:
    """Python that loads the directory with stock diffusers and samples with its export settings;
    it runs as printed from the working directory the ids are relative to."""
    info = ModelCardInfo.coerce(info)
    mid = json.dumps(model_id)
    if usage.lora:
        base = json.dumps(portable_path(info.base_model))
        head = [
            "import torch",
            f"from diffusers import {usage.pipeline_class}, {usage.scheduler_class}",
            "",
            f"# {base}: the base model; {mid}: this directory (paths relative to where they were exported,",
            "# or Hub repo ids once uploaded).",
            f"pipe = {usage.pipeline_class}.from_pretrained({base})",
            f"pipe.scheduler = {usage.scheduler_class}.from_pretrained({mid}, subfolder=\"scheduler\")",
            f"pipe.load_lora_weights({mid})",
        ]
    else:
        remote = ", trust_remote_code=True" if usage.trust_remote_code else ""
        head = [
            "import torch",
            "from diffusers import DiffusionPipeline",
            "",
            f"# {mid}: this directory (a path relative to where it was exported, or a Hub repo id once uploaded).",
            f"pipe = DiffusionPipeline.from_pretrained({mid}{remote})",
        ]
    args = []
    if usage.kind == "text-to-image":
        args.append(f"prompt={json.dumps(EXAMPLE_PROMPT)}")
    elif usage.kind == "class-conditional":
        args.append(f"class_labels={list(range(min(usage.num_classes or 4, 4)))}")
    else:
        args.append("batch_size=4")
    args.append(f"num_inference_steps={usage.num_inference_steps}")
    if usage.guidance_scale is not None:
        args.append(f"guidance_scale={usage.guidance_scale!r}")
    if info.resolution and usage.kind == "text-to-image":
        args += [f"height={int(info.resolution[0])}", f"width={int(info.resolution[1])}"]
    args.append("generator=torch.Generator().manual_seed(0)")
    call = ["images = pipe(", *[f"    {a}," for a in args], ").images", 'images[0].save("sample.png")']
    return "\n".join(head + call)


def _numbers(values: Sequence[float]) -> str:
    """A list of timesteps; long ones as their first three and last two."""
    shown = [f"{float(v):g}" for v in values]
    if len(shown) > 8:
        shown = shown[:3] + ["..."] + shown[-2:]
    return "[" + ", ".join(shown) + "]" + (f" ({len(values)})" if len(values) > 8 else "")


def _relative_text(text: str | None) -> str | None:
    """Free text (a description, a dataset line) without the working directory's absolute prefix."""
    return None if text is None else text.replace(os.getcwd() + os.sep, "")



def _first_heading(text: str) -> str | None:
    match = re.search(r"^# (.+)$", text, re.M)
    return match.group(1).strip() if match else None
