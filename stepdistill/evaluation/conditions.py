"""What an evaluation generates from: prompts (from a file, read by
:func:`stepdistill.data.load_prompts`) or class labels, one per sample.

Every sample has a *group*: the index of its prompt or its class label. Samples of one group
differ only in their seed, which is what per-condition diversity compares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.prompts import load_prompts  # noqa: F401 - re-exported for runner.py and stepdistill.evaluation
from ..errors import StepdistillError


@dataclass(frozen=True)
class Conditions:
    """One condition per sample: ``prompts`` (text-to-image), ``labels`` (class-conditional) or neither."""

    groups: torch.Tensor  # int64 [N]: prompt index or class label of each sample
    prompts: list[str] | None = None  # [N] when prompt-conditioned
    labels: torch.Tensor | None = None  # int64 [N] when class-conditioned

    def __len__(self) -> int:
        return int(self.groups.shape[0])

    @property
    def kind(self) -> str:
        return "prompts" if self.prompts is not None else "labels" if self.labels is not None else "none"

    def head(self, count: int) -> "Conditions":
        """The first ``count`` samples' conditions."""
        return Conditions(
            groups=self.groups[:count],
            prompts=None if self.prompts is None else self.prompts[:count],
            labels=None if self.labels is None else self.labels[:count],
        )


def prompt_conditions(prompts: list[str], samples_per_prompt: int) -> Conditions:
    """Each prompt ``samples_per_prompt`` times, seed-major: the first ``len(prompts)`` samples
    cover every prompt once (what the sample grid shows), then the second seed of each, etc."""
    if samples_per_prompt < 1:
        raise StepdistillError(f"samples per prompt must be at least 1; got {samples_per_prompt}")
    if not prompts:
        raise StepdistillError("no prompts to evaluate")
    groups = torch.arange(len(prompts)).repeat(samples_per_prompt)
    return Conditions(groups=groups, prompts=[prompts[int(g)] for g in groups])


def prompt_groups(prompts: list[str]) -> torch.Tensor:
    """The group of each sample of a prompt list: samples with the same prompt text share one."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(p, len(ids)) for p in prompts])


def label_conditions(labels: torch.Tensor) -> Conditions:
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise StepdistillError("no class labels to evaluate")
    return Conditions(groups=labels.clone(), labels=labels)


def unconditional(num_samples: int) -> Conditions:
    """For unconditional pipelines: all samples form one group."""
    return Conditions(groups=torch.zeros(num_samples, dtype=torch.long))
