"""Small image helpers shared by training, sampling and evaluation."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] tensors [B, C, H, W] -> uint8 arrays [B, H, W, C]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, upscale: int = 1, pad: int = 1) -> Image.Image:
    """Tile a batch of [-1, 1] images into one PIL image (``upscale``: nearest-neighbour zoom)."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    grid = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    return img


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, upscale: int = 4) -> str:
    """Save a sample grid PNG (atomically: written next to ``path`` then renamed)."""
    from .atomic import atomic_file

    with atomic_file(path) as tmp:
        make_grid(images, nrow=nrow, upscale=upscale).save(tmp)
    return os.fspath(path)
