"""The digits data: scikit-learn's bundled 8x8 handwritten digits, scaled to [-1, 1].

A fixed, stratified held-out split (``HELDOUT_SIZE`` images, seed 0) serves the classifier's
accuracy and the noise floor; everything else trains the teacher and the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SIZE = 8
HELDOUT_SIZE = 297  # 1,797 = 1,500 train + 297 held-out
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    images: torch.Tensor  # float32 [N, 1, 8, 8] in [-1, 1]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@lru_cache(maxsize=None)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def to_unit_range(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """sklearn's 0..16 intensities -> [-1, 1]."""
    return torch.as_tensor(pixels, dtype=torch.float32) / 8.0 - 1.0


def load_split(split: str = "train") -> DigitsSplit:
    """``"train"``, ``"heldout"`` or ``"all"``."""
    images, labels = _load()
    if split == "all":
        idx = np.arange(len(labels))
    else:
        from sklearn.model_selection import train_test_split

        train_idx, held_idx = train_test_split(
            np.arange(len(labels)), test_size=HELDOUT_SIZE, stratify=labels, random_state=SPLIT_SEED
        )
        if split == "train":
            idx = np.sort(train_idx)
        elif split == "heldout":
            idx = np.sort(held_idx)
        else:
            raise ValueError(f"unknown split {split!r}; expected train, heldout or all")
    return DigitsSplit(to_unit_range(images[idx]).unsqueeze(1), torch.as_tensor(labels[idx]))
