"""The measured-metrics table of cards and of ``stepdistill eval``'s metrics.md, and the model-index entries."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import StepdistillError

METRICS_START = "<!-- stepdistill:metrics:start -->"
METRICS_END = "<!-- stepdistill:metrics:end -->"

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
    rows = metric_rows(metrics)
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
                task_type=pipeline_tag, dataset_type=slug(reference), dataset_name=reference,
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


def metric_rows(metrics: Metrics | None) -> list[Mapping[str, Any]]:
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

def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unnamed"
