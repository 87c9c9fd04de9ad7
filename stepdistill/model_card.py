"""Model cards (``README.md``) for exported pipeline directories.

A card has diffusers-style YAML front matter, a usage snippet that loads the directory and
samples with the settings it was exported for, and -- only when the caller passes them -- a
table of measured metrics with the exact command that produced them. Nothing here computes or
invents a number: the table shows the values given, as given (floats to 4 significant digits).

An evaluation run that measures a directory later calls :func:`update_model_card_metrics`,
which replaces the metrics section and leaves the rest of the card alone.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .errors import StepdistillError

CARD_NAME = "README.md"
METRICS_START = "<!-- stepdistill:metrics:start -->"
METRICS_END = "<!-- stepdistill:metrics:end -->"
# the code file a custom pipeline directory ships (loaded with trust_remote_code)
PIPELINE_CODE = {"ClassConditionalPipeline": "class_conditional_pipeline.py", "HybridClassConditionalPipeline": "hybrid_class_conditional_pipeline.py"}

# Metrics are one row per measured configuration, e.g.
#   {"model": "student", "steps": 1, "guidance_scale": 1.0, "FD": 3.1, "accuracy": 0.94}
# A single mapping is one row.
Metrics = Sequence[Mapping[str, Any]] | Mapping[str, Any]


@dataclass
class ModelCardInfo:
    """What the exporter knows about a model; every field is optional.

    ``model_id`` is what the usage snippet passes to ``from_pretrained`` (a Hub repo id or a
    path); by default the exported directory's absolute path, so the snippet runs as written.
    """

    title: str | None = None
    description: str | None = None
    base_model: str | None = None
    method: str | None = None
    dataset: str | None = None
    license: str | None = None
    model_id: str | None = None
    tags: list[str] = field(default_factory=list)
    class_names: list[str] | None = None

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


@dataclass
class PipelineUsage:
    """How the exported directory is called: decides the snippet and the pipeline tag."""

    pipeline_class: str  # "ClassConditionalPipeline", "HybridClassConditionalPipeline", "DDIMPipeline", ...
    num_inference_steps: int
    guidance_scale: float = 1.0
    num_classes: int | None = None

    @property
    def class_conditional(self) -> bool:
        return self.num_classes is not None


def render_model_card(
    usage: PipelineUsage,
    info: ModelCardInfo,
    model_id: str,
    metrics: Metrics | None = None,
    command: str | None = None,
) -> str:
    """The full text of ``README.md`` for an exported directory."""
    title = info.title or ("Few-step class-conditional diffusion model" if usage.class_conditional else "Few-step diffusion model")
    lines = ["---", _front_matter(usage, info).rstrip("\n"), "---", "", f"# {title}", ""]
    lines += _description(usage, info)
    lines += ["## Usage", "", "```python", usage_snippet(usage, model_id), "```", ""]
    lines += [metrics_section(metrics, command), ""]
    return "\n".join(lines)


def write_model_card(
    directory: str | os.PathLike,
    usage: PipelineUsage,
    info: ModelCardInfo | Mapping[str, Any] | None = None,
    model_id: str | None = None,
    metrics: Metrics | None = None,
    command: str | None = None,
) -> Path:
    info = ModelCardInfo.coerce(info)
    model_id = info.model_id or model_id or str(Path(directory).resolve())
    path = Path(directory) / CARD_NAME
    path.write_text(render_model_card(usage, info, model_id, metrics, command), encoding="utf-8")
    return path


def update_model_card_metrics(directory: str | os.PathLike, metrics: Metrics, command: str | None = None) -> Path:
    """Replace the measured-metrics section of ``directory/README.md`` (the rest stays as is).

    ``metrics`` replaces any earlier table; ``command`` is the exact command that measured them.
    A card without the section (written by hand) gets it appended.
    """
    path = Path(directory) / CARD_NAME
    if not path.is_file():
        raise StepdistillError(f"no model card at {path}: export the directory with stepdistill first")
    text = path.read_text(encoding="utf-8")
    section = metrics_section(metrics, command)
    start, end = text.find(METRICS_START), text.find(METRICS_END)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(METRICS_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def read_front_matter(directory: str | os.PathLike) -> dict[str, Any]:
    """The YAML front matter of ``directory/README.md`` as a dict."""
    text = (Path(directory) / CARD_NAME).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise StepdistillError(f"{Path(directory) / CARD_NAME} has no YAML front matter")
    end = text.index("\n---", 4)
    return yaml.safe_load(text[4:end]) or {}


# -- sections ---------------------------------------------------------------------------------
def _front_matter(usage: PipelineUsage, info: ModelCardInfo) -> str:
    tags = ["diffusers", "stepdistill", "step-distillation", usage.pipeline_class]
    tags.append("class-conditional" if usage.class_conditional else "unconditional")
    if info.method:
        tags.append(info.method)
    tags += [t for t in info.tags if t not in tags]
    meta: dict[str, Any] = {"library_name": "diffusers"}
    if info.license:
        meta["license"] = info.license
    if info.base_model:
        meta["base_model"] = info.base_model
    if info.dataset:
        meta["datasets"] = [info.dataset]
    # The Hub has no class-conditional tag; DiT-style models use the unconditional one.
    meta["pipeline_tag"] = "unconditional-image-generation"
    meta["tags"] = list(dict.fromkeys(tags))
    return yaml.safe_dump(meta, sort_keys=False)


def _description(usage: PipelineUsage, info: ModelCardInfo) -> list[str]:
    lines = []
    if info.description:
        lines += [info.description, ""]
    what = f"trained with `{info.method}`" if info.method else "exported by stepdistill"
    source = f" from [`{info.base_model}`]({_link(info.base_model)})" if info.base_model else ""
    steps = "1 step" if usage.num_inference_steps == 1 else f"{usage.num_inference_steps} steps"
    lines += [f"A diffusers `{usage.pipeline_class}` {what}{source}; it samples in {steps}."]
    if usage.class_conditional:
        lines += [
            "",
            f"Class labels are integers in `[0, {usage.num_classes})`; classifier-free guidance uses "
            "`uncond + guidance_scale * (cond - uncond)`, so `guidance_scale=1` means no guidance. "
            f"The pipeline code ships in this directory (`{PIPELINE_CODE.get(usage.pipeline_class, 'class_conditional_pipeline.py')}`), hence "
            "`trust_remote_code=True`; calls without `num_inference_steps` / `guidance_scale` use "
            f"{usage.num_inference_steps} / {usage.guidance_scale:g}.",
        ]
        if info.class_names:
            names = ", ".join(f"{i}: {name}" for i, name in enumerate(info.class_names))
            lines += ["", f"Classes: {names}."]
    else:
        lines += ["", "Pass `num_inference_steps` explicitly: the stock `DDIMPipeline` defaults to 50."]
    return lines + [""]


def _link(base_model: str) -> str:
    return base_model if os.path.isabs(base_model) or base_model.startswith(".") else f"https://huggingface.co/{base_model}"


def usage_snippet(usage: PipelineUsage, model_id: str) -> str:
    """Python that loads the directory and samples with its export settings (runs as written)."""
    head = [
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f"pipe = DiffusionPipeline.from_pretrained({json.dumps(model_id)}, trust_remote_code=True)",
    ]
    if usage.class_conditional:
        labels = list(range(min(usage.num_classes, 4)))
        call = [
            "images = pipe(",
            f"    class_labels={labels},",
            f"    num_inference_steps={usage.num_inference_steps},",
            f"    guidance_scale={usage.guidance_scale!r},",
            "    generator=torch.Generator().manual_seed(0),",
            ").images",
        ]
    else:
        call = [
            "images = pipe(",
            "    batch_size=4,",
            f"    num_inference_steps={usage.num_inference_steps},",
            "    eta=0.0,",
            "    generator=torch.Generator().manual_seed(0),",
            ").images",
        ]
    return "\n".join(head + call + ['images[0].save("sample.png")'])


def metrics_section(metrics: Metrics | None, command: str | None = None) -> str:
    """The ``## Measured metrics`` block between its markers (a placeholder when no metrics)."""
    body = ["## Measured metrics", ""]
    rows = _metric_rows(metrics)
    if not rows:
        body += ["No metrics measured yet: `stepdistill` evaluation runs fill this section in.", ""]
    else:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        body += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        body += ["| " + " | ".join(_cell(row.get(col)) for col in columns) + " |" for row in rows]
        body += [""]
        if command:
            body += ["Measured with:", "", "```bash", command.strip(), "```", ""]
    return METRICS_START + "\n" + "\n".join(body) + METRICS_END


def _metric_rows(metrics: Metrics | None) -> list[Mapping[str, Any]]:
    if metrics is None:
        return []
    rows = [metrics] if isinstance(metrics, Mapping) else list(metrics)
    for row in rows:
        if not isinstance(row, Mapping):
            raise StepdistillError(f"metrics must be a dict or a list of dicts (one per row); got a {type(row).__name__} row")
        for key, value in row.items():
            if value is not None and not isinstance(value, (numbers.Real, str)):
                raise StepdistillError(f"metric {key!r} must be a number or a string; got {type(value).__name__}")
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return "nan" if math.isnan(value) else f"{float(value):.4g}"
    return str(value).replace("|", "\\|")


__all__ = [
    "ModelCardInfo",
    "PipelineUsage",
    "read_front_matter",
    "render_model_card",
    "update_model_card_metrics",
    "usage_snippet",
    "write_model_card",
]
