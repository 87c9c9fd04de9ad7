"""Named feature spaces for Fréchet distances: a registry, and two built-in spaces.

A feature space is a factory that builds a feature network -- an ``nn.Module`` with an int
``num_features`` mapping float images [B, C, H, W] in [0, 1] to [B, num_features], the
convention of :mod:`stepdistill.metrics` -- under a name (``--feature NAME``), with a
description that is also its display name in tables and ``metrics.json``. An FD is called
FID only in Inception's space.

Built in:

- ``inception``: the standard FID Inception-v3 from a local weights file (option
  ``inception_weights``; needs torch-fidelity), see :func:`.features.inception_features`;
- ``random-conv``: :class:`RandomConvFeatures`, a fixed, seeded random-weight CNN: no training,
  no download, the same weights on every machine. Its FD ("FD_rc") is not FID.

Benchmarks register their own spaces from a plugin module (:mod:`stepdistill.plugins`, entry
point group ``stepdistill.plugins``), imported the first time a name is missing, so this module
never imports a benchmark.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StepdistillError
from ..plugins import load_plugins
from .features import check_feature_network, inception_features



@dataclass(frozen=True)
class _FeatureSpace:
    factory: Callable[..., nn.Module]
    description: str


_REGISTRY: dict[str, _FeatureSpace] = {}


def register_feature_space(name: str, factory: Callable[..., nn.Module], description: str) -> None:
    """Make ``factory(**options) -> feature network`` available as ``name``; ``description`` is
    the display name reports carry. A name can be registered once."""
    if name in _REGISTRY:
        raise StepdistillError(f"feature space {name!r} is already registered ({_REGISTRY[name].description})")
    _REGISTRY[name] = _FeatureSpace(factory, description)


def feature_spaces() -> dict[str, str]:
    """Every registered feature space (plugins included): ``{name: description}``."""
    load_plugins()
    return {name: space.description for name, space in sorted(_REGISTRY.items())}


def get_feature_space(name: str, **options) -> tuple[nn.Module, str]:
    """The feature network of space ``name``, built with ``options``, and its display name."""
    if name not in _REGISTRY:
        load_plugins()
    if name not in _REGISTRY:
        raise StepdistillError(
            f"unknown feature space {name!r}; known: {', '.join(feature_spaces())} "
            f"(benchmarks register theirs on installation: reinstall stepdistill if one is missing)"
        )
    space = _REGISTRY[name]
    try:
        inspect.signature(space.factory).bind(**options)
    except TypeError:
        raise StepdistillError(f"feature space {name!r} does not take the option(s) {', '.join(options)}") from None
    network = space.factory(**options)
    check_feature_network(network)
    return network, space.description


class RandomConvFeatures(nn.Module):
    """A fixed random-weight CNN: images -> mean log-energy of every channel of every layer.

    Input [B, 1 or 3, H, W] in [0, 1]: quantized to 8-bit levels (as real PNGs are, so a float
    generator is not told apart from 8-bit real images by sub-level differences), grey repeated
    to RGB, resized to ``INPUT_SIZE`` square (pixel replication when enlarging, antialiased
    bilinear when shrinking), mapped to [-1, 1]. Three 3x3 convolutions (3 -> 32 -> 64 -> 128
    channels, reflect padding) at 32, 16 and 8 pixels, each followed by a leaky ReLU, with a
    2x2 average pool between them. Half of the first layer's filters have zero mean (they see
    edges, texture and noise, not flat colour). Every channel a of every layer is pooled as the
    mean over positions of log(``EPSILON`` + a^2): 32 + 64 + 128 = 224 features. In the log,
    a flat region and a noisy or textured one differ by orders of magnitude, which plain mean /
    std pooling hides under the large variation between images (docs/shapes.md).

    Weights: He-uniform integers from a CPU generator seeded with ``SEED``, times one
    correctly-rounded float scale, stored as float32, zero biases: the same bits on every
    machine (no SIMD-dependent random normal, no float reductions).
    """

    SEED = 0
    INPUT_SIZE = 32
    WIDTHS = (32, 64, 128)
    ZERO_MEAN_FILTERS = 16  # of the first layer's 32
    NEGATIVE_SLOPE = 0.2
    EPSILON = 1e-3
    LEVELS = 2**20  # integer weights in [-LEVELS, LEVELS] before scaling

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(self.SEED)
        self.convs = nn.ModuleList()
        in_channels = 3
        for width in self.WIDTHS:
            conv = nn.Conv2d(in_channels, width, 3, padding=1, padding_mode="reflect")
            levels = torch.randint(-self.LEVELS, self.LEVELS + 1, conv.weight.shape, generator=generator, dtype=torch.int64)
            scale = math.sqrt(6.0 / (in_channels * 9)) / self.LEVELS  # uniform on +-sqrt(6 / fan_in): He variance
            if in_channels == 3:
                zero_mean = levels[: self.ZERO_MEAN_FILTERS]
                levels[: self.ZERO_MEAN_FILTERS] = 9 * zero_mean - zero_mean.sum(dim=(2, 3), keepdim=True)  # exact
                weight = levels.double() * scale
                weight[: self.ZERO_MEAN_FILTERS] /= 9
            else:
                weight = levels.double() * scale
            with torch.no_grad():
                conv.weight.copy_(weight.float())
                conv.bias.zero_()
            conv.requires_grad_(False)
            self.convs.append(conv)
            in_channels = width
        self.num_features = sum(self.WIDTHS)

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.INPUT_SIZE, self.INPUT_SIZE)
        if max(images.shape[-2:]) <= self.INPUT_SIZE:
            return F.interpolate(images, size=size, mode="nearest-exact")
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if images.shape[1] != 3:
            raise StepdistillError(f"random-conv features need 1- or 3-channel images; got {images.shape[1]} channels")
        x = (images.float().clamp(0.0, 1.0) * 255.0).round() / 255.0
        x = self._resize(x) * 2.0 - 1.0
        pooled = []
        for index, conv in enumerate(self.convs):
            if index > 0:
                x = F.avg_pool2d(x, 2)
            x = F.leaky_relu(conv(x), self.NEGATIVE_SLOPE)
            pooled.append(torch.log(self.EPSILON + x * x).mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)


def _inception(inception_weights=None) -> nn.Module:
    return inception_features(inception_weights)


register_feature_space("inception", _inception, "Inception-v3 pool (FID), clean-fid resize")
register_feature_space("random-conv", RandomConvFeatures, "FD_rc: Fréchet distance in random-conv features (not FID)")
