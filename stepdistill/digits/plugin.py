"""The digits benchmark as a stepdistill plugin (entry point ``stepdistill.plugins: digits``).

Importing this module registers, for the library's registries (the core never imports digits):

- dataset ``digits`` (the 1,500-image training split, 10 classes) and ``digits-all`` (all 1,797);
- feature space ``digits``: the shipped classifier's penultimate features;
- teacher ``digits``: the shipped class-conditional teacher (``teacher.path: digits``);
- benchmark ``digits`` for distillation runs (periodic FD + accuracy against all real digits; the
  end-of-run ``bench digits`` table of the student) and for ``stepdistill eval`` (pipelines in the
  digits format are sampled and scored exactly as ``stepdistill bench digits`` does).
"""

from __future__ import annotations

from functools import lru_cache


from .data import IMAGE_SIZE, NUM_CLASSES, load_split

CARD = {
    "dataset": "scikit-learn digits (1,500 training images)",
    "license": "apache-2.0",
    "tags": ["digits", "class-conditional"],
    "class_names": [str(i) for i in range(NUM_CLASSES)],
}
TEACHER_CARD = {
    **CARD,
    "title": "stepdistill digits teacher",
    "description": (
        "Class-conditional UNet2DModel (v-prediction, cosine schedule) trained on scikit-learn's 8x8 "
        "handwritten digits; the teacher of stepdistill's CPU reference benchmark. Class 10 is the null "
        "class used for classifier-free guidance."
    ),
    "method": "denoising diffusion training (v-prediction)",
    "tags": ["digits", "class-conditional", "teacher"],
}


def digits_dataset(which: str = "train"):
    """A digits split as an in-memory :class:`~stepdistill.data.TensorImageDataset` (8x8, grey;
    ``open_images`` checks the channels and size a caller asks for)."""
    from ..data import TensorImageDataset

    data = load_split(which)
    dataset = TensorImageDataset(data.images, labels=data.labels, class_names=CARD["class_names"], source=f"digits ({which} split)")
    dataset.card = TEACHER_CARD  # the model card of a teacher trained on it
    return dataset


@lru_cache(maxsize=1)
def digits_reference():
    """All 1,797 real digits in the classifier's features, scored with the bench's own FD + accuracy."""
    from ..evaluation.distribution import per_condition_diversity
    from ..evaluation.features import extract_features
    from ..evaluation.scoring import Reference
    from .bench import evaluate_samples
    from .classifier import feature_module

    real = load_split("all")
    feature = feature_module()
    features = extract_features(real.images, feature)
    info = {"name": f"all {len(real)} real digits", "num_images": len(real), "per_condition_diversity": per_condition_diversity(features, real.labels)}
    return Reference(feature, "digits classifier penultimate features", features, info, scorer=evaluate_samples, benchmark="digits")


class DigitsBenchmark:
    """Scores digits pipelines as ``stepdistill bench digits`` does (see the module docstring)."""

    name = "digits"
    num_classes = NUM_CLASSES

    def __init__(self, evaluation=None, teacher_path=None, channels=None, resolution=None):
        self.settings = evaluation

    # -- distillation runs -----------------------------------------------------------------------
    def evaluator(self):
        from ..evaluation.scoring import make_evaluator

        return make_evaluator(digits_reference())

    def report(self, student_dir, method, output_dir, progress: bool = True):
        """``bench digits`` of the student at its step count, next to the shipped teacher's rows at
        ``evaluation.teacher_steps`` without guidance and at the teacher guidance the run used."""
        return self.report_students([("student", student_dir, method)], output_dir, progress=progress)

    def report_students(self, students, output_dir, progress: bool = True):
        """The same table with a row for each ``(name, pipeline_dir, method)`` (a staged run's
        stages), each at its own step count, above the teacher's rows."""
        from pathlib import Path

        from ..evaluation.benchmarks import RunReport, card_rows
        from .bench import default_teacher_dir, format_comparison, run_bench

        s = self.settings
        out = Path(output_dir)
        results = {}
        for name, student_dir, method in students:
            results[name] = run_bench(student_dir, out / name, num_samples=s.report_samples, steps=(method.num_steps,),
                                      guidance_scales=(method.export_guidance_scale,), progress=progress)
        guidance = sorted({1.0, *(float(m.recipe.teacher.guidance_scale) for _, _, m in students)})
        results["teacher"] = run_bench(default_teacher_dir(), out / "teacher", num_samples=s.report_samples, steps=tuple(s.teacher_steps),
                                       guidance_scales=tuple(guidance), progress=progress)
        table = format_comparison(results)
        (out / "report.md").write_text(table + "\n")
        rows = {name: card_rows(results[name]["rows"], s.report_samples) for name, _, _ in students}
        return RunReport(table, rows, reference=results["teacher"]["reference"], feature="digits classifier penultimate features")

    # -- stepdistill eval ------------------------------------------------------------------------
    def load(self, path, device="cpu"):
        """The pipeline when ``path`` is in the digits format (1 x 8 x 8, 10 classes + null; a
        student, a teacher or a hybrid of both), else None."""
        import json
        import os

        from .bench import load_pipeline

        try:
            with open(os.path.join(path, "model_index.json")) as f:
                name = json.load(f).get("_class_name")
            with open(os.path.join(path, "unet", "config.json")) as f:
                unet = json.load(f)
        except (OSError, ValueError):
            return None
        name = name[-1] if isinstance(name, (list, tuple)) else name
        size = unet.get("sample_size")
        if name not in ("ClassConditionalPipeline", "HybridClassConditionalPipeline") or unet.get("num_class_embeds") != NUM_CLASSES + 1 or unet.get("in_channels") != 1 \
                or size not in (IMAGE_SIZE, [IMAGE_SIZE, IMAGE_SIZE]):
            return None
        return load_pipeline(path, device=device)

    def generate(self, pipe, labels, num_inference_steps, guidance_scale, batch_size=256, seed=0, eta=None):
        from .bench import generate_samples

        images, _ = generate_samples(pipe, labels, num_inference_steps, guidance_scale, batch_size=batch_size, seed=seed, eta=eta)
        return images

    def reference(self):
        return digits_reference()

    def noise_floor(self, num_samples: int, seed: int = 0) -> dict:
        from ..metrics import noise_floor
        from .bench import NOISE_FLOOR_DRAWS
        from .classifier import feature_module

        return noise_floor(load_split("all").images, feature_module(), num_samples=num_samples, draws=NOISE_FLOOR_DRAWS, seed=seed)


def _feature_space():
    from .classifier import feature_module

    return feature_module()


def register() -> None:
    from ..data import register_dataset
    from ..evaluation.benchmarks import register_benchmark
    from ..evaluation.feature_spaces import register_feature_space
    from ..evaluation.generation import register_pipeline_benchmark
    from ..teachers import register_teacher
    from .bench import default_teacher_dir

    register_dataset("digits", lambda: digits_dataset("train"), "scikit-learn digits, training split (1,500, 8x8 grey, 10 classes)")
    register_dataset("digits-all", lambda: digits_dataset("all"), "scikit-learn digits, all 1,797 images")
    register_feature_space("digits", _feature_space, "digits classifier penultimate features")
    register_teacher("digits", default_teacher_dir)
    register_benchmark("digits", DigitsBenchmark)
    register_pipeline_benchmark(DigitsBenchmark())


register()
