"""Distribution metrics on image sets, through torchmetrics.

Fréchet distance (FD) = torchmetrics' ``FrechetInceptionDistance`` with any feature network in
place of Inception: FID is FD with Inception features, the digits benchmark's FD uses the digits
classifier's penultimate features.

Conventions:
- images come in as float tensors [N, C, H, W] in [-1, 1] (the project's convention);
- a feature network is any ``nn.Module`` with an int attribute ``num_features`` that maps a
  float batch [B, C, H, W] in [0, 1] (torchmetrics' ``normalize=True`` convention) to
  [B, num_features]. Wrap networks that want another input range or size.
- everything is batched in a fixed order and accumulated in float64, so results are
  deterministic for given inputs;
- metrics never synchronise across processes (``sync_on_compute=False``): under ``accelerate
  launch`` the main process evaluates alone, on complete sets.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import StepdistillError


def _check_images(images: torch.Tensor, name: str) -> None:
    if not torch.is_tensor(images) or images.dim() != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise StepdistillError(f"{name} must be an image tensor [N, C, H, W]; got {shape}")
    if images.shape[0] < 2:
        raise StepdistillError(f"{name} needs at least 2 images for a Fréchet distance; got {images.shape[0]}")


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.no_grad()
def frechet_distance(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    feature: nn.Module,
    batch_size: int = 512,
) -> float:
    """Fréchet distance between the ``feature`` statistics of two image sets in [-1, 1].

    ``images_a`` is the reference ("real") set; the distance itself is symmetric.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_images(images_a, "images_a")
    _check_images(images_b, "images_b")
    if not isinstance(getattr(feature, "num_features", None), int):
        raise StepdistillError(f"feature network {type(feature).__name__} needs an int attribute num_features")
    was_training = feature.training
    feature.eval()
    try:
        metric = FrechetInceptionDistance(feature=feature, normalize=True, sync_on_compute=False)
        for images, real in ((images_a, True), (images_b, False)):
            for start in range(0, images.shape[0], batch_size):
                metric.update(_to_unit_range(images[start : start + batch_size]), real=real)
        distance = float(metric.compute())
    finally:
        feature.train(was_training)
    # Tiny negative values are round-off of a zero distance (a set against itself).
    return max(distance, 0.0)


def noise_floor(
    real_images: torch.Tensor,
    feature: nn.Module,
    num_samples: int,
    draws: int = 5,
    seed: int = 0,
    batch_size: int = 512,
) -> dict:
    """FD of ``num_samples`` real images drawn with replacement against all of ``real_images``.

    This is the FD a perfect generator would score with a sample of the same size: model FDs
    at that sample size are only meaningful above it. Returns ``{"fd": mean, "fd_std": ...,
    "draws": [...], "num_samples": ...}``.
    """
    _check_images(real_images, "real_images")
    if num_samples < 2 or draws < 1:
        raise StepdistillError(f"noise floor needs num_samples >= 2 and draws >= 1; got {num_samples}, {draws}")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        idx = torch.randint(0, real_images.shape[0], (num_samples,), generator=generator)
        values.append(frechet_distance(real_images, real_images[idx], feature, batch_size=batch_size))
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
    return {"fd": mean, "fd_std": std, "draws": values, "num_samples": num_samples}
