"""The files an evaluation writes: ``samples.png``, ``plot.png``, ``metrics.md``, ``metrics.json``.

Each is written to a temporary name and renamed, ``metrics.json`` last.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import write_json, write_text
from ..images import save_image_grid
from ..model_card import metric_notes, metrics_table

PLOTTED = [
    ("fd", "FD (lower is better)"),
    ("kid", "KID (lower is better)"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("diversity", "per-condition diversity"),
    ("accuracy", "class accuracy"),
    ("clip_score", "CLIP score"),
    ("ms_per_image", "ms per image"),
]


def format_table(results: dict) -> str:
    """The rows of an evaluation as a markdown table whose columns say their units (columns that
    are empty everywhere are left out), the noise floor as a last row where there is one."""
    floor = results.get("noise_floor")
    footer = {"model": "real images (noise floor)", "fd": f"{floor['fd']:.2f} ± {floor['fd_std']:.2f}"} if floor else None
    return metrics_table(results["rows"], footer)


def markdown_report(results: dict) -> str:
    rows = results["rows"]
    conditions = results["conditions"]
    reference = results["reference"].get("name")
    models = ", ".join(f"`{p['name']}` ({p['path']}, {p['kind']}, {p['scheduler']})" for p in results["pipelines"])
    lines = [
        "# Evaluation",
        "",
        f"Models: {models}.",
        "",
        f"{conditions['num_samples']} samples per row ({conditions['kind']}, {conditions['num_conditions']} conditions), "
        f"seed {results['seed']}; features: {results['feature']}; "
        f"reference: {reference or 'none (no real images: no FD / KID / precision / recall)'}. "
        f"Precision/recall: k = {results['pr_k']} nearest neighbours. KID: {results['kid_subsets']} subsets. "
        f"Guidance: {results['guidance_convention']}. "
        f"Latency: median of {rows[0]['latency_repeats'] if rows else '?'} calls at batch "
        f"{rows[0]['latency_batch_size'] if rows else '?'} after one warm-up call on {results['device']} "
        f"({results['torch_threads']} threads); NFE = denoiser evaluations per image.",
        "",
        format_table(results),
        "",
        *[f"- {note}" for note in metric_notes(rows, reference=reference, feature=results["feature"])],
        "",
    ]
    real_diversity = results["reference"].get("per_condition_diversity")
    if real_diversity is not None:
        lines += [f"Per-condition diversity of the real images: {real_diversity:.3f}.", ""]
    if results.get("command"):
        lines += ["Command:", "", "```bash", results["command"], "```", ""]
    lines += [f"Wall time: {results['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def save_samples_grid(grid: list[tuple[str, torch.Tensor]], path: Path) -> str:
    """One row per (model, configuration): the first samples of each, the same seeds in every row."""
    height, width = grid[0][1].shape[-2:]
    columns = max(images.shape[0] for _, images in grid)
    channels = max(images.shape[1] for _, images in grid)
    tiles = []
    for _, images in grid:
        images = images.float()
        if images.shape[1] != channels:
            images = images.repeat(1, channels // images.shape[1], 1, 1)
        if tuple(images.shape[-2:]) != (height, width):
            images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
        padding = torch.full((columns - images.shape[0], channels, height, width), -1.0)
        tiles.append(torch.cat([images, padding]))
    return save_image_grid(torch.cat(tiles), path, nrow=columns, upscale=max(1, 64 // max(height, width)))


def _series_label(row: dict, results: dict) -> str:
    label = row["model"]
    if len(results["guidance_scales"]) > 1 and row.get("guidance_scale") is not None:
        label += f", w={row['guidance_scale']:g}"
    if row.get("gamma") is not None:
        label += f", gamma={row['gamma']:g}"
    return label


def save_plot(results: dict, path: Path) -> str:
    """Each metric against NFE (log scale), one line per model / guidance / gamma, on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = results["rows"]
    metrics = [(key, title) for key, title in PLOTTED if any(row.get(key) is not None for row in rows)]
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    figure, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(_series_label(row, results), []).append(row)
    for axis, (key, title) in zip(axes.flat, metrics):
        for label, members in series.items():
            points = sorted((r["nfe"] if r.get("nfe") is not None else r["steps"], r[key]) for r in members if r.get(key) is not None)
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        if key == "fd" and results.get("noise_floor"):
            axis.axhline(results["noise_floor"]["fd"], color="grey", linestyle="--", label="real images (noise floor)")
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_xlabel("NFE (denoiser evaluations per image)")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    figure.suptitle(f"{results['conditions']['num_samples']} samples per point, features: {results['feature']}", fontsize="medium")
    return _save_figure(figure, path)


def _save_figure(figure, path) -> str:
    """Write a matplotlib figure to ``path`` atomically (no half-written PNG) and close it."""
    import matplotlib.pyplot as plt

    from ..atomic import atomic_file

    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, dpi=110)
    plt.close(figure)
    return str(path)


def read_curve(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a distillation run's ``curve.jsonl`` (step, minutes, fd, ... at each evaluation)."""
    from ..errors import StepdistillError

    path = Path(run_dir) / "curve.jsonl"
    if not path.is_file():
        raise StepdistillError(f"{run_dir} has no curve.jsonl (distillation runs write one at every evaluation)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise StepdistillError(f"{path} is empty: the run has not evaluated yet")
    return rows


def save_training_curves(run_dirs, path: str | os.PathLike, names=None, metric: str = "fd", references=None,
                         log_scale: bool = False) -> str:
    """``metric`` against wall-clock minutes for each run's ``curve.jsonl`` (one line per run);
    ``references``: {label: value} drawn as horizontal lines (e.g. teacher rows at the same N);
    ``log_scale``: a logarithmic metric axis (runs whose values differ by orders of magnitude)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(names) if names else [Path(d).name for d in run_dirs]
    if len(names) != len(run_dirs):
        from ..errors import StepdistillError

        raise StepdistillError(f"{len(names)} names for {len(run_dirs)} runs")
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    samples = set()
    for run_dir, name in zip(run_dirs, names):
        rows = [r for r in read_curve(run_dir) if r.get(metric) is not None]
        axis.plot([r["minutes"] for r in rows], [r[metric] for r in rows], marker="o", label=name)
        info = Path(run_dir) / "run.json"
        if info.is_file():
            samples.add(json.loads(info.read_text()).get("recipe", {}).get("training", {}).get("num_eval_samples"))
    for i, (label, value) in enumerate((references or {}).items()):
        axis.axhline(value, color="grey", linestyle=["--", ":", "-."][i % 3], label=label)
    n = ", ".join(str(v) for v in sorted(x for x in samples if x)) or "?"
    if log_scale:
        axis.set_yscale("log")
    axis.set_xlabel("training wall-clock minutes")
    axis.set_ylabel(f"{metric.upper()} ({n} samples, periodic evaluation)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="small")
    return _save_figure(figure, path)


def write_outputs(results: dict, grid: list[tuple[str, torch.Tensor]], output_dir: Path) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "samples": save_samples_grid(grid, output_dir / "samples.png"),
        "plot": save_plot(results, output_dir / "plot.png"),
        "table": str(output_dir / "metrics.md"),
        "metrics": str(output_dir / "metrics.json"),
        "samples_rows": [label for label, _ in grid],
    }
    results["outputs"] = outputs
    write_text(output_dir / "metrics.md", markdown_report(results))
    write_json(output_dir / "metrics.json", results)
    return outputs
