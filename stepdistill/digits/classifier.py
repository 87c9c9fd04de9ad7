"""A small CNN classifier for the 8x8 digits: class accuracy of samples, and the features of FD.

The shipped weights (``weights/classifier.safetensors``) are retrained with::

    python -c "from stepdistill.digits.classifier import train_classifier; train_classifier('stepdistill/digits/weights/classifier.safetensors')"

Its penultimate layer (``NUM_FEATURES`` values, after ReLU) defines the Fréchet distance ("FD")
of the digits benchmark, the way Inception's pool features define FID.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import IMAGE_SIZE, NUM_CLASSES, load_split

CLASSIFIER_WEIGHTS = Path(__file__).resolve().parent / "weights" / "classifier.safetensors"
NUM_FEATURES = 64


class DigitsClassifier(nn.Module):
    """Input: [B, 1, 8, 8] images in [-1, 1]. Output: [B, 10] logits."""

    def __init__(self, num_features: int = NUM_FEATURES):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.to_features = nn.Linear(64 * (IMAGE_SIZE // 2) ** 2, num_features)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(num_features, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, num_features] of [-1, 1] images."""
        return F.relu(self.to_features(self.conv(images).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))


class DigitsFeatures(nn.Module):
    """The classifier's penultimate features, as a feature network for torchmetrics' FID.

    Takes images the way torchmetrics passes them: float in [0, 1] (``normalize=True``, what
    :mod:`stepdistill.metrics` uses) or uint8 in [0, 255].
    """

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = int(classifier.to_features.out_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return self.classifier.features(images.float() * 2.0 - 1.0)


def _shift_augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    pad = max_shift
    padded = F.pad(images, (pad, pad, pad, pad), value=-1.0)
    offsets = torch.randint(0, 2 * pad + 1, (images.shape[0], 2), generator=generator)
    size = images.shape[-1]
    return torch.stack([padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets.tolist())])


def accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of ``images`` ([-1, 1]) that ``classifier`` assigns to ``labels``."""
    predicted = predict(images, classifier=classifier, batch_size=batch_size)
    return float((predicted == labels.to(predicted.device)).float().mean())


def train_classifier(
    output_path: str | os.PathLike | None = None,
    seed: int = 0,
    epochs: int = 40,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    augment: bool = True,
    log: bool = True,
) -> tuple[DigitsClassifier, float]:
    """Train the classifier on the digits train split; returns (model in eval mode, held-out accuracy).

    Writes the weights as safetensors to ``output_path`` when given (atomically).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = load_split("train")
    heldout = load_split("heldout")
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch
    )
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), batch_size):
            idx = order[start : start + batch_size]
            images, labels = train.images[idx], train.labels[idx]
            if augment:
                images = _shift_augment(images, generator)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if log and (epoch + 1) % 10 == 0:
            model.eval()
            print(f"epoch {epoch + 1}/{epochs}: held-out accuracy {accuracy(model, heldout.images, heldout.labels):.4f}")
    model.eval()
    heldout_accuracy = accuracy(model, heldout.images, heldout.labels)
    if output_path is not None:
        from ..atomic import save_safetensors

        save_safetensors(model.state_dict(), output_path, metadata={"heldout_accuracy": f"{heldout_accuracy:.4f}", "seed": str(seed)})
    return model, heldout_accuracy


def load_classifier_from(path: str | os.PathLike) -> DigitsClassifier:
    """A classifier from a safetensors file, in eval mode."""
    from ..evaluation.features import load_frozen

    return load_frozen(DigitsClassifier(), path, "digits classifier")


@lru_cache(maxsize=1)
def load_classifier() -> DigitsClassifier:
    """The shipped classifier, in eval mode (cached; do not train it in place)."""
    return load_classifier_from(CLASSIFIER_WEIGHTS)


def feature_module(classifier: DigitsClassifier | None = None) -> DigitsFeatures:
    """The FD feature network (default: the shipped classifier's penultimate features)."""
    return DigitsFeatures(classifier if classifier is not None else load_classifier()).eval()  # evaluation restores this mode


@torch.no_grad()
def predict(images: torch.Tensor, classifier: nn.Module | None = None, batch_size: int = 512) -> torch.Tensor:
    """Predicted classes (int64 [N]) of [N, 1, 8, 8] images in [-1, 1]."""
    classifier = classifier if classifier is not None else load_classifier()
    was_training = classifier.training
    classifier.eval()
    try:
        parts = [classifier(images[i : i + batch_size].float()).argmax(dim=1) for i in range(0, len(images), batch_size)]
    finally:
        classifier.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
