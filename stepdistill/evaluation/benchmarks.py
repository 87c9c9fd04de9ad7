"""What scores a distillation run: the periodic evaluation during training and the table at its end.

A *benchmark* has two jobs:

- ``evaluator()``: ``(images, labels) -> {metric: value}`` for the trainer's periodic evaluation
  (the FD-versus-minutes curve of ``curve.jsonl``);
- ``report(student_dir, method, output_dir)``: the end-of-run table, the exported student's row
  next to the teacher's rows at equal N, written to ``output_dir`` and returned as markdown.

A benchmark package (digits) registers its own with :func:`register_benchmark` from a plugin
(:mod:`stepdistill.plugins`); a recipe selects it by name (``evaluation.benchmark``) or by naming
its dataset (``data.images: digits``). Any other recipe with real images gets
:class:`DataBenchmark`: FD / KID / precision / recall / diversity against those images in a named
feature space (``evaluation.feature``: Inception from local weights, else the documented
random-conv features -- never silently called FID).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..atomic import write_json, write_text
from ..config import bounded
from ..errors import StepdistillError

BENCHMARKS: dict[str, Callable[..., Any]] = {}


@dataclass
class EvaluationSection:
    """Recipe section ``evaluation:``: periodic evaluation (every ``training.eval_every`` steps,
    ``training.num_eval_samples`` samples) and the end-of-run table."""

    benchmark: Optional[str] = None  # a registered benchmark ("digits"); None: the data's own, else FD against `reference`
    feature: str = "auto"  # feature space of FD: auto / inception / random-conv / a registered name
    reference: Optional[str] = None  # real images for FD; None: data.images
    heldout: Optional[str] = None  # other real images: the noise floor is FD of N of them (None: N drawn from the reference)
    inception_weights: Optional[str] = None  # local torch-fidelity Inception weights (feature inception)
    report: bool = True  # the end-of-run table: student next to the teacher, N = report_samples
    report_samples: int = bounded(2000, ge=1)
    teacher_steps: list[int] = bounded(default_factory=lambda: [1, 2, 4, 10], ge=1)  # teacher rows of the table


@dataclass
class RunReport:
    """What a benchmark's end-of-run report returns: the table the run prints (``str(report)``) and
    each student's rows at N = ``evaluation.report_samples``, flat (numbers and text), which the run
    writes into the student's model card -- so the card states the numbers the table printed."""

    table: str
    students: dict[str, list[dict[str, Any]]]
    reference: Optional[str] = None  # the real images FD was measured against
    feature: Optional[str] = None  # the feature space

    def __str__(self) -> str:
        return self.table


def card_rows(rows: list[dict[str, Any]], num_samples: int) -> list[dict[str, Any]]:
    """Rows for a model card: numbers and text only (one level of dicts flattened to ``key_sub``),
    with ``num_samples``."""
    flat = []
    for row in rows:
        out: dict[str, Any] = {"num_samples": num_samples}
        for key, value in row.items():
            if isinstance(value, dict):
                out.update({f"{key}_{sub}": v for sub, v in value.items() if isinstance(v, (int, float, str)) or v is None})
            elif isinstance(value, (int, float, str)) or value is None:
                out[key] = value
        flat.append(out)
    return flat


def register_benchmark(name: str, factory: Callable[..., Any]) -> None:
    """``factory(evaluation_section, teacher_path, channels, resolution) -> benchmark``."""
    BENCHMARKS[name] = factory


def registered_benchmark(name: str | None) -> Callable[..., Any] | None:
    if name is None:
        return None
    if name not in BENCHMARKS:
        from ..plugins import load_plugins

        load_plugins()
    return BENCHMARKS.get(name)


def benchmark_for(evaluation, data_images: str | None, teacher_path: str, channels: int, resolution: tuple[int, int]):
    """The benchmark of a run: ``evaluation.benchmark`` by name, else the one registered under the
    name of the data (``data.images: digits``), else FD against ``evaluation.reference`` /
    ``data.images``; None when there are no real images to compare with."""
    if evaluation.benchmark is not None:
        factory = registered_benchmark(evaluation.benchmark)
        if factory is None:
            raise StepdistillError(f"evaluation.benchmark: unknown benchmark {evaluation.benchmark!r}; registered: {', '.join(sorted(BENCHMARKS)) or 'none'}")
        return factory(evaluation, teacher_path, channels, resolution)
    spec = evaluation.reference or data_images
    if spec is None:
        return None
    factory = registered_benchmark(spec) if not os.path.exists(spec) else None
    if factory is not None:
        return factory(evaluation, teacher_path, channels, resolution)
    return DataBenchmark(evaluation, spec, teacher_path, channels, resolution)


class DataBenchmark:
    """FD (and KID, precision / recall, diversity) against real images in a named feature space."""

    def __init__(self, evaluation, reference: str, teacher_path: str, channels: int, resolution: tuple[int, int]):
        from ..data import open_images
        from .feature_spaces import get_feature_space

        self.settings = evaluation
        self.reference_spec = reference
        self.teacher_path = teacher_path
        self.dataset = open_images(reference, channels=channels, resolution=resolution)
        name = evaluation.feature
        if name == "auto":
            name = "inception" if evaluation.inception_weights else "random-conv"
        options = {"inception_weights": evaluation.inception_weights} if name == "inception" else {}
        self.feature, self.feature_name = get_feature_space(name, **options)
        self._reference = None

    def reference(self):
        """Features of every reference image (computed once)."""
        from .features import extract_features
        from .scoring import Reference

        if self._reference is None:
            parts = []
            for start in range(0, len(self.dataset), 256):
                images = self.dataset.images(list(range(start, min(start + 256, len(self.dataset)))))
                parts.append(extract_features(images, self.feature))
            info = {"name": self.dataset.summary(), "num_images": len(self.dataset)}
            self._reference = Reference(self.feature, self.feature_name, torch.cat(parts), info)
        return self._reference

    def evaluator(self):
        from .scoring import make_evaluator

        return make_evaluator(self.reference())

    def noise_floor(self, num_samples: int, seed: int = 0, draws: int = 3) -> dict:
        """What a perfect generator scores at this N: FD of the first ``num_samples`` held-out real
        images (``evaluation.heldout``) against the reference, or, without held-out images, of
        ``num_samples`` reference images drawn with replacement (optimistic: the draw repeats images)."""
        from ..data import open_images
        from .distribution import fid_from_features
        from .features import extract_features

        features = self.reference().features
        if self.settings.heldout:
            heldout = open_images(self.settings.heldout, channels=self.dataset.channels, resolution=(self.dataset.height, self.dataset.width))
            if len(heldout) < num_samples:
                raise StepdistillError(f"evaluation.heldout has {len(heldout)} images; the noise floor at N = {num_samples} needs as many")
            fd = fid_from_features(features, extract_features(heldout.images(list(range(num_samples))), self.feature))
            return {"fd": fd, "fd_std": 0.0, "num_samples": num_samples, "draws": [fd], "source": heldout.summary()}
        g = torch.Generator().manual_seed(seed)
        values = [fid_from_features(features, features[torch.randint(0, len(features), (num_samples,), generator=g)]) for _ in range(draws)]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
        return {"fd": mean, "fd_std": std, "num_samples": num_samples, "draws": values, "source": "reference images drawn with replacement"}

    def report(self, student_dir, method, output_dir, progress: bool = True) -> RunReport:
        """The student's row next to the teacher's (DDIM, trailing spacing for VP teachers) at N = report_samples."""
        return self.report_students([("student", student_dir, method)], output_dir, progress=progress)

    def report_students(self, students, output_dir, progress: bool = True) -> RunReport:
        """The same table with a row for each ``(name, pipeline_dir, method)`` (a staged run's stages)."""
        from tqdm.auto import tqdm

        from ..sampling import make_student_scheduler
        from .conditions import unconditional
        from .generation import generate_images, load_eval_pipeline
        from .scoring import score_images

        n = self.settings.report_samples
        teacher = load_eval_pipeline(self.teacher_path, "teacher")
        loaded = [(load_eval_pipeline(student_dir, name), method.num_steps) for name, student_dir, method in students]
        if teacher.kind != "unconditional" or any(model.kind != "unconditional" for model, _ in loaded):
            raise StepdistillError("the data benchmark's table is for unconditional pixel pipelines; evaluate others with `stepdistill eval`")
        conditions = unconditional(n)
        configs = [(teacher, s) for s in self.settings.teacher_steps] + loaded
        rows = []
        began = time.perf_counter()
        for model, steps in tqdm(configs, desc="report", unit="config", disable=not progress):
            if model is teacher and hasattr(model.pipe.scheduler.config, "beta_schedule"):
                model.pipe.scheduler = make_student_scheduler(model.pipe.scheduler, steps)
            start = time.perf_counter()
            images = generate_images(model, conditions, steps, None, seed=0, batch_size=256)
            seconds = time.perf_counter() - start
            scores = score_images(images, conditions, self.reference(), kid_subsets=20, seed=0)
            rows.append({"model": model.name, "steps": steps, **scores, "images_per_second": n / seconds})
        results = {
            "reference": self.reference().info, "feature": self.feature_name, "num_samples": n,
            "noise_floor": self.noise_floor(n), "rows": rows, "wall_seconds": time.perf_counter() - began,
            "teacher": os.fspath(self.teacher_path), "students": {name: os.fspath(path) for name, path, _ in students},
        }
        table = format_report(results)
        out = Path(output_dir)
        write_json(out / "report.json", results)
        write_text(out / "report.md", table + "\n")
        students_rows = {name: card_rows([r for r in rows if r["model"] == name], n) for name, _, _ in students}
        return RunReport(table, students_rows, reference=self.reference().info["name"], feature=self.feature_name)


def format_report(results: dict) -> str:
    floor = results["noise_floor"]
    lines = [
        f"{results['feature']}; reference: {results['reference']['name']}; N = {results['num_samples']} per row",
        "",
        "| model | steps | FD ↓ | KID ↓ | precision | recall | images/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['model']} | {row['steps']} | {row['fd']:.3f} | {row['kid']:.4f} | {row['precision']:.3f} "
                     f"| {row['recall']:.3f} | {row['images_per_second']:.0f} |")
    spread = f" ± {floor['fd_std']:.3f}" if len(floor["draws"]) > 1 else ""
    lines.append(f"| real images (noise floor) | – | {floor['fd']:.3f}{spread} | – | – | – | – |")
    lines.append("")
    lines.append(f"Noise floor: {floor['source']}. Teacher rows: DDIM with trailing spacing for VP teachers (the first step at t = T - 1); students: their own exported scheduler.")
    return "\n".join(lines)


__all__ = ["BENCHMARKS", "DataBenchmark", "EvaluationSection", "RunReport", "benchmark_for", "card_rows", "format_report", "register_benchmark", "registered_benchmark"]
