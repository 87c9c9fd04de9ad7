"""Feature networks for FID / KID / precision-recall / diversity, and batched feature extraction.

A feature network is any ``nn.Module`` with an int ``num_features`` that maps float images
[B, C, H, W] in [0, 1] to [B, num_features] (the convention of :mod:`stepdistill.metrics`).
Named ones are registered in :mod:`.feature_spaces` (``--feature NAME``), among them:

- the digits classifier's penultimate features (``stepdistill.digits.classifier.feature_module``);
- :func:`inception_features`: the standard FID Inception-v3 (torch-fidelity's port of the
  TensorFlow graph, through torchmetrics), read from a local weights file, with clean-fid-style
  resizing (PIL bicubic to 299x299 on each channel before quantizing to uint8);
- a fixed random-weight CNN (``random-conv``, :class:`.feature_spaces.RandomConvFeatures`);

and the caller can pass any other network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import StepdistillError

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_SIZE = 299


class IdentityFeatures(nn.Module):
    """Passes precomputed features through, so torchmetrics' FID / KID can run on cached features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def check_feature_network(feature: nn.Module) -> None:
    if not isinstance(feature, nn.Module) or not isinstance(getattr(feature, "num_features", None), int):
        raise StepdistillError(f"a feature network must be an nn.Module with an int num_features; got {type(feature).__name__}")


@torch.no_grad()
def load_frozen(module: nn.Module, path: str | os.PathLike, what: str) -> nn.Module:
    """``module`` with the weights of the safetensors file ``path``, in eval mode and frozen: a
    benchmark's shipped network (``what`` names it in the error when the file is missing)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StepdistillError(f"{what} weights not found: {path}")
    module.load_state_dict(load_file(path))
    return module.eval().requires_grad_(False)


def extract_features(images: torch.Tensor, feature: nn.Module, batch_size: int = 256) -> torch.Tensor:
    """Features float64 [N, num_features] of images [N, C, H, W] in [-1, 1], in fixed batches."""
    check_feature_network(feature)
    was_training = feature.training
    feature.eval()
    device = next(feature.parameters(), torch.empty(0)).device
    try:
        parts = []
        for start in range(0, images.shape[0], batch_size):
            batch = ((images[start : start + batch_size].float() + 1.0) / 2.0).clamp(0.0, 1.0)
            parts.append(feature(batch.to(device)).double().cpu().reshape(batch.shape[0], -1))
    finally:
        feature.train(was_training)
    features = torch.cat(parts) if parts else torch.zeros(0, feature.num_features, dtype=torch.float64)
    if features.shape[1] != feature.num_features:
        raise StepdistillError(f"feature network returned {features.shape[1]} features but says num_features={feature.num_features}")
    return features


def feature_fingerprint(feature: nn.Module) -> str:
    """A hash of a feature network's class and weights: part of the reference-statistics cache key."""
    digest = hashlib.sha256(f"{type(feature).__module__}.{type(feature).__qualname__}:{feature.num_features}".encode())
    for name, tensor in sorted(feature.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def clean_resize(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """clean-fid-style resize: quantize [0, 1] images to uint8 values, resize every channel with
    PIL bicubic in float, clip to [0, 255] and round to uint8. [B, C, H, W] -> uint8 [B, C, size, size]."""
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().numpy()
    out = np.empty((pixels.shape[0], pixels.shape[1], size, size), dtype=np.float32)
    for b in range(pixels.shape[0]):
        for c in range(pixels.shape[1]):
            channel = Image.fromarray(pixels[b, c].astype(np.float32))
            out[b, c] = np.asarray(channel.resize((size, size), resample=Image.BICUBIC))
    return torch.from_numpy(out.clip(0, 255).round().astype(np.uint8))


class InceptionFeatures(nn.Module):
    """FID's Inception-v3 pool features (2048) with clean-fid-style resizing; grey images are
    repeated to 3 channels."""

    def __init__(self, inception: nn.Module, num_features: int = 2048):
        super().__init__()
        self.inception = inception
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if images.shape[1] != 3:
            raise StepdistillError(f"Inception features need 1- or 3-channel images; got {images.shape[1]} channels")
        device = next(self.inception.parameters()).device
        return self.inception(clean_resize(images).to(device)).reshape(images.shape[0], -1)


def inception_features(weights_path: str | os.PathLike | None) -> InceptionFeatures:
    """The standard FID Inception network from a local weights file (nothing is downloaded)."""
    missing = []
    if importlib.util.find_spec("torch_fidelity") is None:
        missing.append("the torch-fidelity package (pip install torch-fidelity)")
    if weights_path is None:
        missing.append(f"its weights file {INCEPTION_WEIGHTS_FILE} (pass a local copy with --inception-weights; source: {INCEPTION_WEIGHTS_URL})")
    elif not os.path.isfile(weights_path):
        missing.append(f"the Inception weights file {os.fspath(weights_path)} (not found)")
    if missing:
        raise StepdistillError(
            "FID with Inception features needs " + " and ".join(missing) + "; or choose another feature network (--feature)"
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    network = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=os.fspath(weights_path)
    )
    return InceptionFeatures(network)
