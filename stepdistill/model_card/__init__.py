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

The card's jobs, one module each: :mod:`.usage` (what a directory is), :mod:`.paths`,
:mod:`.metrics` (the metrics table, shared with ``stepdistill eval``), :mod:`.card` (rendering).
"""

from .card import ModelCardInfo, read_front_matter, render_model_card, update_model_card_metrics, usage_snippet, write_model_card
from .metrics import METRIC_COLUMNS, METRICS_END, METRICS_START, Metrics, eval_results, metric_notes, metrics_section, metrics_table
from .paths import inside_installed_package, portable_path
from .usage import CARD_NAME, LORA_WEIGHTS, PipelineUsage, pipeline_kind, read_usage

__all__ = [
    "CARD_NAME",
    "LORA_WEIGHTS",
    "METRICS_END",
    "METRICS_START",
    "Metrics",
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
