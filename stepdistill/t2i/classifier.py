"""The t2i attribute classifier: prompt accuracy of samples, and the features of the t2i FD.

A small CNN on 32x32 RGB images in [-1, 1] with one linear head per attribute of
:data:`~stepdistill.t2i.data.ATTRIBUTES` (size, colour, shape, position, background). A sample
follows its prompt when every head predicts the value its caption states (the CPU analogue of
GenEval's object / colour / position checks). Its penultimate layer (``NUM_FEATURES`` values,
after ReLU) defines the Fréchet distance ("FD") of the t2i benchmark, the way the digits
classifier defines the digits FD.

Trained on the training split only (``t2i_image(0, i, "train")``, i < 10,000, made in memory), with
the colour channels randomly permuted (the colour label remapped): that permutation turns e.g. a red
square into a green one, a held-out pair, so the classifier *does* see the held-out pairs'
appearance (as recoloured training images) -- its held-out accuracy is not a composition test of
the classifier, only of the generators it scores. Without the permutation it read shape from
colour (held-out accuracy 0.01). Its accuracy is reported on the test split (the training
distribution) and on the held-out split. The shipped weights
(``weights/classifier.safetensors``) are retrained, deterministically at one thread, with::

    OMP_NUM_THREADS=1 python -m stepdistill.t2i.classifier --output stepdistill/t2i/weights/classifier.safetensors
"""

from __future__ import annotations

import itertools
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StepdistillError
from .data import ATTRIBUTES, SIZE, t2i_image

CLASSIFIER_WEIGHTS = Path(__file__).resolve().parent / "weights" / "classifier.safetensors"
NUM_FEATURES = 128
TRAIN_IMAGES = 10000
EVAL_IMAGES = {"test": 2000, "heldout": 500}


def real_images(count: int, split: str = "train", seed: int = 0, start: int = 0) -> tuple[torch.Tensor, list]:
    """Images ``start .. start+count-1`` of ``split`` as float [N, 3, 32, 32] in [-1, 1], and their scenes."""
    arrays, scenes = [], []
    for index in range(start, start + count):
        image, scene = t2i_image(seed, index, split)
        arrays.append(np.asarray(image))
        scenes.append(scene)
    if not arrays:
        return torch.zeros(0, 3, SIZE, SIZE), []
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0, scenes


def scene_labels(scenes) -> dict[str, torch.Tensor]:
    """``{attribute: int64 [N]}``: the value index of every attribute of every scene."""
    labels = [scene.labels() for scene in scenes]
    return {name: torch.tensor([item[name] for item in labels], dtype=torch.long) for name in ATTRIBUTES}


class AttributeClassifier(nn.Module):
    """Input: [B, 3, 32, 32] images in [-1, 1]. Output: ``{attribute: [B, num_values] logits}``."""

    def __init__(self, num_features: int = NUM_FEATURES):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),  # two convolutions at full size: corners of small shapes
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 32 -> 16
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4: the flattened map keeps where things are (position)
        )
        self.to_features = nn.Linear(64 * (SIZE // 8) ** 2, num_features)
        self.dropout = nn.Dropout(0.2)
        self.heads = nn.ModuleDict({name: nn.Linear(num_features, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, num_features] of [-1, 1] images."""
        return F.relu(self.to_features(self.conv(images).flatten(1)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.dropout(self.features(images))
        return {name: head(hidden) for name, head in self.heads.items()}


class AttributeFeatures(nn.Module):
    """The classifier's penultimate features, as a feature network for torchmetrics' FID.

    Takes images the way torchmetrics passes them: float in [0, 1] (``normalize=True``, what
    :mod:`stepdistill.metrics` and :func:`~stepdistill.evaluation.features.extract_features` use)
    or uint8 in [0, 255].
    """

    def __init__(self, classifier: AttributeClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = int(classifier.to_features.out_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return self.classifier.features(images.float() * 2.0 - 1.0)


def _channel_permutations() -> tuple[torch.Tensor, torch.Tensor]:
    """The 6 permutations of the RGB channels [6, 3] and, per permutation, where each colour value
    goes [6, num colours]: a channel permutation maps the pure hues onto each other (red -> green ->
    blue, yellow -> cyan -> magenta, ...) and keeps grey backgrounds grey."""
    import colorsys

    from .data import HUES

    colours = ATTRIBUTES["colour"]
    rgb = {name: tuple(round(c) for c in colorsys.hsv_to_rgb(HUES[name], 1.0, 1.0)) for name in colours}
    by_rgb = {value: name for name, value in rgb.items()}
    perms = list(itertools.permutations(range(3)))
    table = [[colours.index(by_rgb[tuple(rgb[name][k] for k in perm)]) for name in colours] for perm in perms]
    return torch.tensor(perms), torch.tensor(table)


def _augment(images: torch.Tensor, colour: torch.Tensor, generator: torch.Generator,
             max_sigma: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random RGB channel permutation per image (its colour label follows), then Gaussian noise
    of a per-image std in [0, max_sigma] ([-1, 1] units).

    The permutation decorrelates colour and shape: the training split never shows the held-out
    (colour, shape) pairs, and without it the shape head learns to read shape partly from colour
    (measured: held-out shape accuracy 0.01). The noise keeps the heads off the renderer's exact
    pixel statistics (generated samples are noisier)."""
    perms, table = _channel_permutations()
    choice = torch.randint(0, len(perms), (images.shape[0],), generator=generator)
    index = perms[choice][:, :, None, None].expand_as(images)
    images = torch.gather(images, 1, index)
    colour = table[choice, colour]
    sigma = torch.rand(images.shape[0], 1, 1, 1, generator=generator) * max_sigma
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(-1.0, 1.0), colour


@torch.no_grad()
def classify(images: torch.Tensor, classifier: AttributeClassifier | None = None, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """Predicted value index (int64 [N]) of every attribute for [N, 3, 32, 32] images in [-1, 1]."""
    classifier = classifier if classifier is not None else load_classifier()
    if not torch.is_tensor(images) or images.dim() != 4 or tuple(images.shape[1:]) != (3, SIZE, SIZE):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise StepdistillError(f"t2i images must have shape [N, 3, {SIZE}, {SIZE}]; got {shape}")
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in ATTRIBUTES}
    try:
        for start in range(0, len(images), batch_size):
            logits = classifier(images[start : start + batch_size].float().to(device))
            for name in ATTRIBUTES:
                parts[name].append(logits[name].argmax(dim=1).cpu())
    finally:
        classifier.train(was_training)
    return {name: torch.cat(values) if values else torch.zeros(0, dtype=torch.long) for name, values in parts.items()}


@torch.no_grad()
def classify_features(features: torch.Tensor, classifier: AttributeClassifier | None = None) -> dict[str, torch.Tensor]:
    """:func:`classify` from penultimate features already extracted (``feature_module()``'s output,
    e.g. the FD features of a sample set): the heads only, one network pass serves both metrics."""
    classifier = classifier if classifier is not None else load_classifier()
    device = next(classifier.parameters()).device
    hidden = features.to(device=device, dtype=torch.float32)
    return {name: head(hidden).argmax(dim=1).cpu() for name, head in classifier.heads.items()}


def attribute_accuracy(predicted: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per attribute: the fraction of predictions equal to ``labels``; ``all``: every attribute right."""
    correct = {name: predicted[name] == labels[name] for name in ATTRIBUTES}
    result = {name: float(hit.float().mean()) for name, hit in correct.items()}
    result["all"] = float(torch.stack(list(correct.values())).all(dim=0).float().mean())
    return result


def evaluate_classifier(classifier: AttributeClassifier | None = None, counts: dict[str, int] | None = None) -> dict[str, dict[str, float]]:
    """Accuracy per attribute (and ``all``) on real images of the test and held-out splits (seed 0)."""
    result = {}
    for split, count in (counts or EVAL_IMAGES).items():
        images, scenes = real_images(count, split)
        result[split] = attribute_accuracy(classify(images, classifier), scene_labels(scenes))
    return result


def train_classifier(
    output_path: str | os.PathLike | None = None,
    seed: int = 0,
    num_images: int = TRAIN_IMAGES,
    epochs: int = 12,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    augment: bool = True,
    log: bool = True,
) -> tuple[AttributeClassifier, dict[str, dict[str, float]]]:
    """Train the classifier on ``num_images`` training-split images; returns (model in eval mode,
    ``{split: {attribute: accuracy, "all": ...}}`` on the test and held-out splits).

    Writes the weights as safetensors to ``output_path`` when given (atomically), with the
    measured accuracies in its metadata.
    """
    import json

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, scenes = real_images(num_images, "train")
    labels = scene_labels(scenes)
    model = AttributeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps_per_epoch = (num_images + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(num_images, generator=generator)
        total = 0.0
        for start in range(0, num_images, batch_size):
            idx = order[start : start + batch_size]
            batch = images[idx]
            targets = {name: values[idx] for name, values in labels.items()}
            if augment:
                batch, targets["colour"] = _augment(batch, targets["colour"], generator)
            logits = model(batch)
            loss = sum(F.cross_entropy(logits[name], targets[name]) for name in ATTRIBUTES)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        if log:
            print(f"epoch {epoch + 1}/{epochs}: training loss {total / num_images:.4f}", flush=True)
    model.eval()
    accuracy = evaluate_classifier(model)
    if log:
        for split, values in accuracy.items():
            print(f"{split}: " + ", ".join(f"{name} {value:.4f}" for name, value in values.items()), flush=True)
    if output_path is not None:
        from ..atomic import save_safetensors

        metadata = {"accuracy": json.dumps(accuracy), "seed": str(seed), "num_images": str(num_images), "epochs": str(epochs)}
        save_safetensors(model.state_dict(), output_path, metadata=metadata)
    return model, accuracy


def load_classifier_from(path: str | os.PathLike) -> AttributeClassifier:
    """A classifier from a safetensors file, in eval mode."""
    from ..evaluation.features import load_frozen

    return load_frozen(AttributeClassifier(), path, "t2i classifier")


@lru_cache(maxsize=1)
def load_classifier() -> AttributeClassifier:
    """The shipped classifier, in eval mode (cached; do not train it in place)."""
    return load_classifier_from(CLASSIFIER_WEIGHTS)


def feature_module(classifier: AttributeClassifier | None = None) -> AttributeFeatures:
    """The FD feature network (default: the shipped classifier's penultimate features)."""
    return AttributeFeatures(classifier if classifier is not None else load_classifier()).eval()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stepdistill.t2i.classifier",
                                     description="Retrain the t2i attribute classifier (prompt accuracy and the t2i FD features).")
    parser.add_argument("--output", default=os.fspath(CLASSIFIER_WEIGHTS), help="safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=TRAIN_IMAGES, help="training-split images")
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args(argv)
    train_classifier(args.output, seed=args.seed, num_images=args.num_images, epochs=args.epochs)
    print(f"t2i classifier written to {args.output}")


if __name__ == "__main__":
    main()
