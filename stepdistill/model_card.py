"""Model cards (``README.md``) for exported pipeline directories and LoRA files.

A card is rendered from what the export wrote, never from what a caller says it wrote:

- ``model_index.json`` gives the pipeline class -- a stock diffusers class, or our
  ``ClassConditionalPipeline`` whose code travels in the directory (``trust_remote_code``) --
  and from the class's ``__call__`` the task: a ``prompt`` (text-to-image), ``class_labels``
  (class-conditional) or neither (unconditional);
- ``scheduler/scheduler_config.json`` gives the scheduler the snippet samples with;
- a LoRA directory (``pytorch_lora_weights.safetensors`` + ``scheduler/``, no
  ``model_index.json``) is loaded on top of its base pipeline with ``load_lora_weights``.

The front matter is huggingface_hub's :class:`~huggingface_hub.ModelCardData` (``pipeline_tag``,
``base_model``, ``license``, ``datasets``, ``tags``, and the measured metrics as
:class:`~huggingface_hub.EvalResult` entries of ``model-index``), rendered with
:meth:`ModelCard.from_template` and read back with :meth:`ModelCard.load`. The body says what the
model is (method, recipe, base model, steps, timesteps, guidance), has a usage snippet that runs
as printed, and the measured metrics -- only numbers a caller measured, with the command that
measured them (floats to 4 significant digits or the column's fixed digits).

Paths in a card are never absolute paths of the exporting machine: :func:`portable_path` makes
them relative to the working directory (or, outside it, the directory's name), and the snippet
says which directory each id stands for.

``stepdistill eval --update-model-card`` calls :func:`update_model_card_metrics`, which replaces
the metrics section and the ``model-index`` and leaves the rest of the card alone;
:func:`inside_installed_package` tells it which directories it must never touch.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import numbers
import os
import re
import site
import sysconfig
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import StepdistillError

CARD_NAME = "README.md"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
METRICS_START = "<!-- stepdistill:metrics:start -->"
METRICS_END = "<!-- stepdistill:metrics:end -->"
OUR_PIPELINES = {"ClassConditionalPipeline": "class-conditional", "HybridClassConditionalPipeline": "class-conditional"}  # pipeline code shipped in the directory
# The Hub's pipeline tags (its task list) have no class-conditional task: class-conditional
# models (DiT on the Hub too) are filed under unconditional-image-generation and tagged.
PIPELINE_TAGS = {"text-to-image": "text-to-image", "class-conditional": "unconditional-image-generation",
                 "unconditional": "unconditional-image-generation"}
EXAMPLE_PROMPT = "a photo of a cat"

# Metrics are one row per measured configuration of this model, e.g.
#   {"steps": 1, "guidance_scale": 1.0, "num_samples": 2000, "fd": 3.1, "kid": 0.4, "kid_std": 1.2}
# with the keys of METRIC_COLUMNS (other keys become extra columns, titled by their key).
# A single mapping is one row.
Metrics = Sequence[Mapping[str, Any]] | Mapping[str, Any]


@dataclass(frozen=True)
class MetricColumn:
    key: str
    title: str  # with its unit; "↓" / "↑": lower / higher is better
    digits: int | None = None  # fixed digits after the point; None: 4 significant digits (integers, text as they are)
    eval_type: str | None = None  # the model-index metric type, for metrics measured against a dataset


# The columns of every metrics table: `stepdistill eval`'s metrics.md and the model cards.
METRIC_COLUMNS = (
    MetricColumn("model", "model"),
    MetricColumn("steps", "steps"),
    MetricColumn("guidance_scale", "guidance w", 2),
    MetricColumn("gamma", "TCD gamma", 2),
    MetricColumn("num_samples", "samples (N)"),
    MetricColumn("nfe", "NFE (denoiser calls / image)", 0),
    MetricColumn("fd", "FD ↓ (feature units²)", 2, "fd"),
    MetricColumn("kid", "KID ↓ (mean ± std, raw)", None, "kid"),
    MetricColumn("precision", "precision ↑ (0-1)", 3, "precision"),
    MetricColumn("recall", "recall ↑ (0-1)", 3, "recall"),
    MetricColumn("diversity", "diversity ↑ (feature units)", 3),
    MetricColumn("accuracy", "class accuracy ↑ (0-1)", 3, "accuracy"),
    MetricColumn("clip_score", "CLIP score ↑ (0-100)", 2, "clip_score"),
    MetricColumn("ms_per_image", "latency (ms / image)", 2),
    MetricColumn("images_per_second", "throughput (images / s)", 1),
    MetricColumn("peak_memory_mib", "peak memory (MiB)", 1),
)
# keys a row carries that are not columns of their own
ROW_DETAILS = {"kid_std", "peak_memory_kind", "latency_batch_size", "latency_repeats"}

KID_NOTE = (
    "KID is torchmetrics' unbiased estimate of the squared MMD with the cubic polynomial kernel "
    "k(x, y) = (x·y / d + 1)³ on the raw features (d: feature dimension), mean ± std over random subsets. It is "
    "not multiplied by 1000 (papers often print Inception KID x 10³), and its size grows with the cube of the "
    "features' scale: KID is comparable only within one feature space (in the digits classifier's features, "
    "where x·x / d is about 23, a clearly worse model scores in the hundreds; in Inception features values are "
    "around 10⁻³). Being unbiased, it scatters around 0 when the two sets are close and can then be slightly "
    "negative: a negative value, or one within about two stds of 0, means the sets are not told apart at this N."
)
PEAK_MEMORY_NOTES = {
    "cpu_peak_rss": "peak memory: the process's peak resident set size (VmHWM) during the timed calls "
                    "(reset before them), in MiB -- it includes every model the process holds",
    "cpu_peak_rss_since_start": "peak memory: the process's peak resident set size since it started "
                                "(ru_maxrss; this system cannot reset it per configuration), in MiB",
    "cuda_max_allocated": "peak memory: the device's peak allocated memory during the timed calls "
                          "(torch.cuda.max_memory_allocated, weights included), in MiB",
}


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


# -- paths ------------------------------------------------------------------------------------------
def portable_path(path: str | os.PathLike | None) -> str | None:
    """``path`` as a card may print it: never an absolute path of this machine.

    A relative name that is no path here (a Hub id, a registered teacher name) stays as given; a
    local path (absolute, or existing) becomes relative to the working directory when it lies
    inside it (as the user wrote it, if relative), else its last component.
    """
    if path is None:
        return None
    text = os.fspath(path)
    if not (os.path.isabs(text) or os.path.exists(text)):
        return text
    absolute = os.path.abspath(text)
    cwd = os.getcwd()
    if os.path.commonpath([absolute, cwd]) == cwd and absolute != cwd:
        return Path(os.path.relpath(absolute, cwd)).as_posix()
    return os.path.basename(os.path.normpath(absolute))


def inside_installed_package(path: str | os.PathLike) -> str | None:
    """Where ``path`` lies inside an installed (importable) Python package -- site-packages, or a
    package imported from a source checkout (an editable install such as stepdistill's own
    ``digits/weights``) -- that location; else None. Such directories are package data that
    nothing may rewrite."""
    resolved = Path(path).resolve()
    roots = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")} | set(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        roots.add(site.getusersitepackages())
    for root in roots:
        root = Path(root).resolve()
        if root in resolved.parents or root == resolved:
            return str(root)
    # the top-most directory above `path` that is a package (has __init__.py) and is importable as one
    top = None
    for candidate in [resolved, *resolved.parents]:
        if (candidate / "__init__.py").is_file():
            top = candidate
        elif top is not None:
            break
    if top is None:
        return None
    try:
        spec = importlib.util.find_spec(top.name)
    except (ImportError, ValueError):
        return None
    locations = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec is not None else []
    return str(top) if top in locations else None


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
    rows = _metric_rows(metrics)
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
    rows = _metric_rows(metrics)
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


# -- metrics ----------------------------------------------------------------------------------------
def metrics_table(rows: Sequence[Mapping[str, Any]], footer: Mapping[str, str] | None = None) -> str:
    """The rows as a markdown table with the columns of :data:`METRIC_COLUMNS` (with units) that
    any row fills, then any other keys; ``footer``: one more row of preformatted cells."""
    columns = _columns(rows)
    lines = ["| " + " | ".join(c.title for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row, c) for c in columns) + " |" for row in rows]
    if footer:
        lines.append("| " + " | ".join(footer.get(c.key, "–") for c in columns) + " |")
    return "\n".join(lines)


def metric_notes(rows: Sequence[Mapping[str, Any]], *, reference: str | None = None, feature: str | None = None) -> list[str]:
    """What the table's numbers are measured in (only for the columns present)."""
    present = {c.key for c in _columns(rows)}
    notes = []
    if present & {"fd", "kid", "diversity", "precision", "recall"}:
        space = f"{feature}" if feature else "the evaluation's feature space"
        against = f" against {reference}" if reference else ""
        notes.append(f"FD, KID, precision/recall and diversity are measured in {space}{against}; FD is in squared "
                     "feature units (FID only with Inception features), diversity is the mean pairwise feature distance "
                     "between samples of the same condition.")
    if "kid" in present:
        notes.append(KID_NOTE)
    kinds = sorted({row.get("peak_memory_kind") for row in rows if row.get("peak_memory_kind")})
    notes += [PEAK_MEMORY_NOTES.get(kind, f"peak memory: {kind}, in MiB") + "." for kind in kinds]
    return notes


def metrics_section(
    metrics: Metrics | None, command: str | None = None, *, reference: str | None = None, feature: str | None = None
) -> str:
    """The ``## Measured metrics`` block between its markers (a placeholder when no metrics)."""
    body = ["## Measured metrics", ""]
    rows = _metric_rows(metrics)
    if not rows:
        body += ["No metrics measured yet: `stepdistill eval DIR --update-model-card` fills this section in.", ""]
    else:
        body += [metrics_table(rows), ""]
        body += [f"- {note}" for note in metric_notes(rows, reference=reference, feature=feature)]
        body += [""] if metric_notes(rows, reference=reference, feature=feature) else []
        if command:
            body += ["Measured with:", "", "```bash", command.strip(), "```", ""]
    return METRICS_START + "\n" + "\n".join(body) + METRICS_END


def eval_results(rows: Sequence[Mapping[str, Any]], pipeline_tag: str, reference: str | None, feature: str | None) -> list:
    """The rows' dataset metrics (FD, KID, precision, recall, accuracy, CLIP score) as
    :class:`huggingface_hub.EvalResult` entries; none without a named reference set."""
    from huggingface_hub import EvalResult

    if not reference:
        return []
    results = []
    for row in rows:
        setting = {k: row[k] for k in ("steps", "guidance_scale", "gamma", "num_samples") if row.get(k) is not None}
        label = ", ".join(f"{k}={_plain(v)}" for k, v in setting.items())
        for column in METRIC_COLUMNS:
            value = row.get(column.key)
            if column.eval_type is None or not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
                continue
            results.append(EvalResult(
                task_type=pipeline_tag, dataset_type=_slug(reference), dataset_name=reference,
                metric_type=column.eval_type, metric_value=_plain(value),
                metric_name=f"{column.title.split(' (')[0].rstrip(' ↓↑')} ({label})" if label else column.title,
                metric_args={**setting, **({"features": feature} if feature else {})} or None,
            ))
    return results


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[MetricColumn]:
    known = {c.key for c in METRIC_COLUMNS}
    columns = [c for c in METRIC_COLUMNS if any(row.get(c.key) is not None for row in rows)]
    extra = dict.fromkeys(k for row in rows for k in row if k not in known and k not in ROW_DETAILS)
    return columns + [MetricColumn(k, k) for k in extra]


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


def _cell(row: Mapping[str, Any], column: MetricColumn) -> str:
    value = row.get(column.key)
    if value is None:
        return "–"
    if isinstance(value, str):
        return value.replace("|", "\\|")
    text = _number(value, column.digits)
    if column.key == "kid" and row.get("kid_std") is not None:
        text += f" ± {_number(row['kid_std'], column.digits)}"
    return text


def _number(value, digits: int | None) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if math.isnan(value):
        return "nan"
    return f"{float(value):.{digits}f}" if digits is not None else f"{float(value):.4g}"


def _plain(value):
    """A number as YAML writes it plainly (numpy scalars -> Python)."""
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if isinstance(value, numbers.Real) else value


def _numbers(values: Sequence[float]) -> str:
    """A list of timesteps; long ones as their first three and last two."""
    shown = [f"{float(v):g}" for v in values]
    if len(shown) > 8:
        shown = shown[:3] + ["..."] + shown[-2:]
    return "[" + ", ".join(shown) + "]" + (f" ({len(values)})" if len(values) > 8 else "")


def _relative_text(text: str | None) -> str | None:
    """Free text (a description, a dataset line) without the working directory's absolute prefix."""
    return None if text is None else text.replace(os.getcwd() + os.sep, "")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unnamed"


def _first_heading(text: str) -> str | None:
    match = re.search(r"^# (.+)$", text, re.M)
    return match.group(1).strip() if match else None


__all__ = [
    "METRIC_COLUMNS",
    "ModelCardInfo",
    "PipelineUsage",
    "eval_results",
    "inside_installed_package",
    "metric_notes",
    "metrics_section",
    "metrics_table",
    "pipeline_kind",
    "portable_path",
    "read_front_matter",
    "read_usage",
    "render_model_card",
    "update_model_card_metrics",
    "usage_snippet",
    "write_model_card",
]
