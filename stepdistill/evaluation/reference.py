"""Reference ("real") features of an image folder, computed once per (folder, feature network)
and cached as safetensors.

The folder is read flat (no sub-folders), files in sorted name order; every image must have the
same size. Images are streamed in batches, so a folder larger than memory is fine. The cache
key covers each file's name, size and modification time and the feature network's weights:
change any of them and the features are recomputed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from ..errors import StepdistillError
from .features import extract_features, feature_fingerprint

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stepdistill" / "reference_features"


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files of ``folder`` (sorted); a clear error when it has none or mixed sizes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StepdistillError(f"real image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise StepdistillError(f"real image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    first_size = None
    for path in files:
        try:
            with Image.open(path) as image:
                size = image.size
        except (OSError, UnidentifiedImageError) as exc:
            raise StepdistillError(f"cannot read real image {path}: {exc}".splitlines()[0]) from None
        if first_size is None:
            first_size, first_path = size, path
        elif size != first_size:
            raise StepdistillError(
                f"real images must all have one size: {first_path.name} is {first_size[0]}x{first_size[1]}, "
                f"{path.name} is {size[0]}x{size[1]}"
            )
    return files


def load_images(files: list[Path], channels: int) -> torch.Tensor:
    """Images [N, channels, H, W] in [-1, 1] (``channels``: 1 = grey, 3 = RGB)."""
    if channels not in (1, 3):
        raise StepdistillError(f"real images can be read as 1 or 3 channels; the model makes {channels}")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for path in files:
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert(mode), dtype=np.uint8))
        except (OSError, UnidentifiedImageError) as exc:
            raise StepdistillError(f"cannot read real image {path}: {exc}".splitlines()[0]) from None
    pixels = torch.from_numpy(np.stack(arrays))
    pixels = pixels.unsqueeze(1) if channels == 1 else pixels.permute(0, 3, 1, 2)
    return pixels.float() / 127.5 - 1.0


def _cache_key(files: list[Path], channels: int, fingerprint: str) -> str:
    digest = hashlib.sha256(f"{fingerprint}:{channels}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def reference_features(
    folder: str | os.PathLike,
    feature: nn.Module,
    channels: int = 3,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> tuple[torch.Tensor, dict]:
    """Features float64 [N, D] of the images in ``folder``, from the cache when it has them.

    Returns ``(features, info)``; ``info`` says where the cache file is and whether it was hit.
    """
    from safetensors.torch import load_file

    from ..atomic import save_safetensors

    files = list_images(folder)
    key = _cache_key(files, channels, feature_fingerprint(feature))
    cache_path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.safetensors"
    info = {"folder": os.fspath(folder), "num_images": len(files), "cache_file": str(cache_path)}
    if cache_path.is_file():
        features = load_file(cache_path)["features"]
        if features.shape[0] == len(files):
            return features, {**info, "cache_hit": True}
    parts = []
    for start in range(0, len(files), batch_size):
        images = load_images(files[start : start + batch_size], channels)
        parts.append(extract_features(images, feature, batch_size=batch_size))
    features = torch.cat(parts)
    save_safetensors({"features": features}, cache_path, metadata={"folder": os.fspath(folder), "num_images": str(len(files))})
    return features, {**info, "cache_hit": False}
