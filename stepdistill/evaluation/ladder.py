"""The sanity ladder of a feature space: FDs of real images under corruptions of growing strength.

A feature space is worth an FD only if the FD grows with the damage done to real images: the
ladder compares a reference set of real images with a second, disjoint set of real images, as
they are and after Gaussian noise, Gaussian blur, a colour shift and mode collapse. Each row is
the FD a generator making exactly those images would score against that reference at that
sample count, so the rows are the scale against which models are read (``stepdistill features
ladder``; docs/shapes.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from ..errors import StepdistillError
from ..images import to_uint8
from .distribution import fid_from_features
from .feature_spaces import get_feature_space
from .features import extract_features
from .reference import list_images, load_images

NOISE_SIGMAS = (0.02, 0.05, 0.1, 0.2)  # in [-1, 1] units
BLUR_RADII = (0.5, 1.0, 2.0)  # PIL GaussianBlur radius, in pixels
COLOUR_SHIFT = 0.1  # added to the first channel (red; brightness for grey images), [-1, 1] units
COLLAPSE_REPEATS = 10  # partial mode collapse: N / 10 distinct images, each repeated 10 times


def add_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Images plus seeded Gaussian noise of std ``sigma`` ([-1, 1] units), clipped to [-1, 1]."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + sigma * noise).clamp(-1.0, 1.0)


def blur(images: torch.Tensor, radius: float) -> torch.Tensor:
    """Every image as 8-bit, blurred by PIL's ``GaussianBlur(radius)``, back in [-1, 1]."""
    pixels = to_uint8(images)
    channels = pixels.shape[-1]
    out = []
    for array in pixels:
        image = Image.fromarray(array[..., 0] if channels == 1 else array).filter(ImageFilter.GaussianBlur(radius))
        out.append(np.asarray(image).reshape(array.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def shift_colour(images: torch.Tensor, amount: float = COLOUR_SHIFT) -> torch.Tensor:
    shifted = images.clone()
    shifted[:, 0] += amount
    return shifted.clamp(-1.0, 1.0)


def collapse(images: torch.Tensor, distinct: int) -> torch.Tensor:
    """As many images, but only the first ``distinct`` of them, repeated in turn."""
    return images[torch.arange(images.shape[0]) % distinct]


def _corruptions(images: torch.Tensor, noise_sigmas, blur_radii, seed: int):
    """(corruption, strength, label, images) for every rung of the ladder, in order."""
    n = images.shape[0]
    yield "none", 0.0, "real vs real", images
    for sigma in noise_sigmas:
        yield "noise", sigma, f"Gaussian noise sigma {sigma:g}", add_noise(images, sigma, seed)
    for radius in blur_radii:
        yield "blur", radius, f"Gaussian blur radius {radius:g}", blur(images, radius)
    yield "colour shift", COLOUR_SHIFT, f"channel 0 + {COLOUR_SHIFT:g}", shift_colour(images)
    distinct = max(1, n // COLLAPSE_REPEATS)
    yield "mode collapse", float(distinct), f"{distinct} distinct images, each x{COLLAPSE_REPEATS}", collapse(images, distinct)
    yield "mode collapse", 1.0, f"1 image x{n}", collapse(images, 1)


def feature_ladder(
    real_a: torch.Tensor,
    real_b: torch.Tensor,
    feature: str | nn.Module,
    *,
    noise_sigmas=NOISE_SIGMAS,
    blur_radii=BLUR_RADII,
    seed: int = 0,
    batch_size: int = 256,
) -> list[dict]:
    """FD rows of real images ``real_b`` (as they are, then corrupted) against the reference ``real_a``.

    Both are [N, C, H, W] in [-1, 1] and should be disjoint sets of real images: ``real_a`` the
    reference (equal N, or a whole training folder for the noise floor), ``real_b`` N fresh
    images. ``feature``: a registered feature-space name or a feature network. Rows:
    ``{"corruption", "strength", "label", "num_reference", "num_samples", "fd"}``.
    """
    if isinstance(feature, str):
        feature, _ = get_feature_space(feature)
    if real_a.shape[1:] != real_b.shape[1:]:
        raise StepdistillError(f"the two real sets differ in image shape: {tuple(real_a.shape[1:])} vs {tuple(real_b.shape[1:])}")
    reference = extract_features(real_a, feature, batch_size=batch_size)
    rows = []
    for corruption, strength, label, images in _corruptions(real_b, noise_sigmas, blur_radii, seed):
        fd = fid_from_features(reference, extract_features(images, feature, batch_size=batch_size))
        rows.append({"corruption": corruption, "strength": strength, "label": label,
                     "num_reference": real_a.shape[0], "num_samples": images.shape[0], "fd": fd})
    return rows


def format_ladder(rows: list[dict]) -> str:
    """The ladder as a markdown table."""
    lines = ["| corruption | FD |", "|---|---:|"]
    lines += [f"| {row['label']} | {row['fd']:.4f} |" for row in rows]
    return "\n".join(lines)


def read_folder(folder: str | os.PathLike, num_images: int) -> torch.Tensor:
    """The first ``num_images`` images of ``folder`` (sorted names), [N, C, H, W] in [-1, 1]:
    grey (C = 1) when the first image is, else RGB. Fewer images than asked is an error."""
    files = list_images(folder)
    if len(files) < num_images:
        raise StepdistillError(f"{folder} holds {len(files)} images; {num_images} were asked for")
    with Image.open(files[0]) as first:
        channels = 1 if first.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    return load_images(files[:num_images], channels)


def folder_ladder(
    real_dir: str | os.PathLike,
    other_real_dir: str | os.PathLike,
    feature: str = "random-conv",
    *,
    num_samples: int = 2000,
    reference_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    **feature_options,
) -> dict:
    """:func:`feature_ladder` of the first ``num_samples`` images of ``other_real_dir`` against the
    first ``reference_samples`` (default: as many) of ``real_dir``, in the registered feature space
    ``feature``. Returns ``{"feature": display name, "num_reference", "num_samples", "rows"}``."""
    if Path(real_dir).resolve() == Path(other_real_dir).resolve():
        raise StepdistillError("the ladder compares two disjoint sets of real images: give two different folders")
    if num_samples < 2 or (reference_samples is not None and reference_samples < 2):
        raise StepdistillError("the ladder needs at least 2 images in each set")
    network, name = get_feature_space(feature, **feature_options)
    reference = read_folder(real_dir, num_samples if reference_samples is None else reference_samples)
    real = read_folder(other_real_dir, num_samples)
    rows = feature_ladder(reference, real, network, seed=seed, batch_size=batch_size)
    return {"feature": name, "num_reference": reference.shape[0], "num_samples": real.shape[0], "rows": rows}
