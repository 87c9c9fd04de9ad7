"""The t2i benchmark of a distillation run (``evaluation.benchmark: t2i``, or ``data.images: t2i``).

- ``evaluator()``: the trainer's periodic evaluation of a text-to-image student: prompt accuracy
  (overall and per attribute), FD, precision / recall and per-prompt diversity of its samples for
  the prompts they were drawn for (:func:`~stepdistill.t2i.bench.score_samples`); the curve of
  ``curve.jsonl``.
- ``report()``: ``stepdistill bench t2i`` of the exported student at its step count and export
  guidance, next to the run's teacher at ``evaluation.teacher_steps`` with w = 1 and with the
  run's teacher guidance -- the same prompts, noise and scoring as the docs tables, N =
  ``evaluation.report_samples`` seen-prompt samples (and a quarter as many held-out ones).
"""

from __future__ import annotations

from pathlib import Path


class T2IBenchmark:
    """Scores text-to-image runs as ``stepdistill bench t2i`` scores pipelines."""

    name = "t2i"

    def __init__(self, evaluation=None, teacher_path=None, channels=None, resolution=None):
        self.settings = evaluation
        self.teacher_path = teacher_path

    def evaluator(self):
        from ..errors import StepdistillError
        from .bench import score_samples

        def evaluate(images, prompts) -> dict[str, float]:
            if prompts is None or not isinstance(prompts, list):
                raise StepdistillError("the t2i benchmark scores text-to-image samples against their prompts")
            scores = score_samples(images, prompts)
            attributes = {f"{name}_accuracy": value for name, value in scores.pop("attribute_accuracy").items()}
            return {key: float(value) for key, value in {**scores, **attributes}.items() if value is not None}

        return evaluate

    def report(self, student_dir, method, output_dir, progress: bool = True):
        return self.report_students([("student", student_dir, method)], output_dir, progress=progress)

    def report_students(self, students, output_dir, progress: bool = True):
        """A row for each ``(name, pipeline_dir, method)`` at its own step count and export
        guidance, then the teacher's rows; the table is written to ``output_dir/report.md``."""
        from ..atomic import write_json, write_text
        from ..evaluation.benchmarks import RunReport, card_rows
        from .bench import format_comparison, run_bench

        s = self.settings
        n = s.report_samples
        common = {"num_samples": n, "heldout_samples": max(n // 4, 1), "progress": progress}
        out = Path(output_dir)
        results = {}
        for name, student_dir, method in students:
            results[name] = run_bench(student_dir, out / name, steps=(method.num_steps,),
                                      guidance_scales=(float(method.export_guidance_scale),), **common)
        guidance = sorted({1.0, *(float(m.recipe.teacher.guidance_scale) for _, _, m in students)})
        results["teacher"] = run_bench(self.teacher_path, out / "teacher", steps=tuple(s.teacher_steps),
                                       guidance_scales=tuple(guidance), **common)
        table = format_comparison(results)
        write_text(out / "report.md", table + "\n")
        write_json(out / "report.json", results)
        rows = {name: card_rows(results[name]["rows"], n) for name, _, _ in students}
        return RunReport(table, rows, reference=results["teacher"]["reference"], feature=results["teacher"]["feature_space"])
