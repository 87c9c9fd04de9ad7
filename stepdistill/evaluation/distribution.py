"""Metrics on feature sets: FD / FID and KID (torchmetrics), precision / recall, diversity.

Every function here takes features (float [N, D], from :func:`.features.extract_features`), so
features of a real image folder are computed once, cached, and reused for every model.
"""

from __future__ import annotations

import torch

from ..errors import StepdistillError
from .features import IdentityFeatures


def _check_features(features: torch.Tensor, name: str, minimum: int = 2) -> None:
    if not torch.is_tensor(features) or features.dim() != 2:
        raise StepdistillError(f"{name} must be a feature matrix [N, D]")
    if features.shape[0] < minimum:
        raise StepdistillError(f"{name} needs at least {minimum} samples; got {features.shape[0]}")


@torch.no_grad()
def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between two feature sets, computed by torchmetrics' FrechetInceptionDistance."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_features(real, "real features")
    _check_features(fake, "generated features")
    metric = FrechetInceptionDistance(feature=IdentityFeatures(real.shape[1]), normalize=True, sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return max(float(metric.compute()), 0.0)  # tiny negative values are round-off of zero


@torch.no_grad()
def kid_from_features(
    real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over random subsets) by torchmetrics, seeded.

    ``subset_size`` is capped at the smaller set's size.
    """
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    _check_features(real, "real features")
    _check_features(fake, "generated features")
    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=IdentityFeatures(real.shape[1]), subsets=subsets, subset_size=size, sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws its subsets from the global RNG
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance of every point to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = []
    for start in range(0, features.shape[0], batch_size):
        distances = torch.cdist(features[start : start + batch_size], features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the 1st is the point itself
    return torch.cat(radii)


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of ``queries`` inside at least one ball (centre, radius): the k-NN manifold."""
    inside = 0
    for start in range(0, queries.shape[0], batch_size):
        distances = torch.cdist(queries[start : start + batch_size], centres)
        inside += int((distances <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / queries.shape[0]


@torch.no_grad()
def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, batch_size: int = 1024) -> dict:
    """Improved precision and recall (Kynkäänniemi et al., 2019) in feature space.

    Precision: fraction of generated samples inside the real manifold (the union of balls
    around real points reaching their k-th nearest real neighbour). Recall: fraction of real
    samples inside the generated manifold.
    """
    if k < 1:
        raise StepdistillError(f"precision/recall needs k >= 1; got {k}")
    _check_features(real, "real features", minimum=k + 1)
    _check_features(fake, "generated features", minimum=k + 1)
    real, fake = real.double(), fake.double()
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    return {
        "precision": _fraction_inside(fake, real, real_radii, batch_size),
        "recall": _fraction_inside(real, fake, fake_radii, batch_size),
    }


@torch.no_grad()
def per_condition_diversity(features: torch.Tensor, groups: torch.Tensor) -> float | None:
    """Mean pairwise feature distance among samples of the same condition (prompt or class),
    averaged over conditions. Samples of one condition differ only by seed, so a student that
    collapses to one image per condition scores 0. ``None`` when no condition has 2 samples."""
    groups = torch.as_tensor(groups).reshape(-1)
    if groups.shape[0] != features.shape[0]:
        raise StepdistillError(f"got {features.shape[0]} feature rows but {groups.shape[0]} condition ids")
    values = []
    for group in torch.unique(groups).tolist():
        members = features[groups == group].double()
        if members.shape[0] >= 2:
            values.append(float(torch.pdist(members).mean()))
    return sum(values) / len(values) if values else None
