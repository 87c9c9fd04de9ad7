"""The t2i benchmark as a stepdistill plugin (entry point ``stepdistill.plugins: t2i``).

Importing this module registers, for the library's registries (the core never imports t2i):

- dataset ``t2i``: the training split (images 0..9,999 of seed 0, 32x32 RGB, with their captions),
  made in memory: the same images and captions as ``stepdistill data t2i DIR`` writes to DIR/train;
- feature space ``t2i``: the shipped attribute classifier's penultimate features (the t2i FD);
- teachers ``t2i-sd`` and ``t2i-flow``: the shipped text-to-image teachers
  (``stepdistill/t2i/weights/sd`` and ``.../flow``; an error names the folder while one is missing).

- benchmark ``t2i`` (:class:`~.run_benchmark.T2IBenchmark`): what scores a distillation run on the
  t2i teachers (``evaluation.benchmark: t2i``, or ``data.images: t2i``): prompt accuracy and FD
  during training, the ``bench t2i`` table of student and teacher at its end.

``stepdistill eval`` has no t2i entry (its interface is class labels); ``stepdistill bench t2i``
scores text-to-image pipelines.
"""

from __future__ import annotations

CARD = {
    "dataset": "stepdistill t2i: procedural captioned 32x32 scenes (10,000 training images)",
    "license": "apache-2.0",
    "tags": ["t2i", "text-to-image"],
}


def t2i_dataset(num_images: int = 10000):
    """The training split as an in-memory :class:`~stepdistill.data.TensorImageDataset` of the text
    kind (images in [-1, 1], one caption each)."""
    from ..data import TensorImageDataset
    from .classifier import real_images

    images, scenes = real_images(num_images, "train")
    dataset = TensorImageDataset(images, captions=[scene.caption for scene in scenes], source=f"t2i (training split, {num_images} images)")
    dataset.card = CARD
    return dataset


def _feature_space():
    from .classifier import feature_module

    return feature_module()


def register() -> None:
    from ..data import register_dataset
    from ..evaluation.benchmarks import register_benchmark
    from ..evaluation.feature_spaces import register_feature_space
    from ..teachers import register_teacher
    from .bench import FEATURE_SPACE, TEACHERS, teacher_dir
    from .run_benchmark import T2IBenchmark

    register_dataset("t2i", t2i_dataset, "t2i procedural captioned scenes, training split (10,000, 32x32 RGB, captions)")
    register_feature_space("t2i", _feature_space, FEATURE_SPACE)
    register_benchmark("t2i", T2IBenchmark)
    for name in TEACHERS:
        register_teacher(name, lambda name=name: teacher_dir(name))


register()
