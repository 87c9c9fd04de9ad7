"""Scoring one set of generated images: the function every evaluation goes through.

``stepdistill eval`` calls :func:`score_images` once per (model, steps, guidance, gamma), and the
trainer's periodic evaluation calls it on its samples, so the numbers seen during training and
after come from the same code. A benchmark can hand its own ``scorer`` in the
:class:`Reference` (the digits benchmark's FD against all real digits + class accuracy), so
``eval`` reproduces the benchmark's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import StepdistillError
from .conditions import Conditions
from .distribution import fid_from_features, kid_from_features, per_condition_diversity, precision_recall
from .features import extract_features


@dataclass
class Reference:
    """Real features to compare against, and the network that made them."""

    feature: nn.Module
    feature_name: str
    features: torch.Tensor | None  # float64 [N, D]; None: no real images (no FD / KID / precision / recall)
    info: dict = field(default_factory=dict)
    # a benchmark's own FD (+ accuracy): (images, labels) -> {"fd": ..., ...}, used instead of the generic FD
    scorer: Callable[[torch.Tensor, "torch.Tensor | None"], dict] | None = None
    benchmark: str | None = None  # the benchmark whose reference this is ("digits")


def score_images(
    images: torch.Tensor,
    conditions: Conditions,
    reference: Reference,
    clip=None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    seed: int = 0,
    batch_size: int = 256,
) -> dict:
    """Metrics of generated ``images`` ([N, C, H, W] in [-1, 1], one per condition).

    Keys: ``fd``, ``kid``, ``kid_std``, ``precision``, ``recall`` (``None`` without real
    features), ``diversity`` (mean pairwise feature distance across seeds within a condition),
    ``accuracy`` (digits only), ``clip_score`` (when ``clip`` -- a local CLIP directory or a
    ``(model, processor)`` pair -- is given and the conditions are prompts).
    """
    if images.shape[0] != len(conditions):
        raise StepdistillError(f"got {images.shape[0]} images for {len(conditions)} conditions")
    scores: dict = {}
    features = extract_features(images, reference.feature, batch_size=batch_size)
    if reference.scorer is not None:
        scores.update(reference.scorer(images, conditions.labels))  # the benchmark's own numbers
    elif reference.features is not None:
        scores["fd"] = fid_from_features(reference.features, features)
    if reference.features is not None:
        scores["kid"], scores["kid_std"] = kid_from_features(
            reference.features, features, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
        scores.update(precision_recall(reference.features, features, k=pr_k))
    scores["diversity"] = per_condition_diversity(features, conditions.groups)
    if clip is not None and conditions.prompts is not None:
        from .clip import clip_score

        scores["clip_score"] = clip_score(images, conditions.prompts, clip, batch_size=batch_size)
    return scores


def make_evaluator(reference: Reference, **score_kwargs):
    """An evaluator for the trainer's periodic evaluation: ``(images, labels) -> {metric: float}``
    through :func:`score_images` (the numbers ``stepdistill eval`` reports for the same samples).
    Metrics that do not apply (``None``) are left out.
    """
    from .conditions import Conditions, label_conditions, prompt_groups, unconditional

    def evaluate(images: torch.Tensor, labels: torch.Tensor | list[str] | None) -> dict[str, float]:
        if isinstance(labels, list):  # a text-to-image student's prompts: samples grouped by prompt text
            conditions = Conditions(groups=prompt_groups(labels), prompts=labels)
        else:
            conditions = label_conditions(labels) if labels is not None else unconditional(images.shape[0])
        scores = score_images(images, conditions, reference, **score_kwargs)
        return {key: float(value) for key, value in scores.items() if value is not None}

    return evaluate
