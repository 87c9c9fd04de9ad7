"""The shapes data: procedural RGB images of coloured shapes on simple backgrounds.

Image ``index`` of seed ``seed`` is a pure function of ``(seed, index, size)``: its random
numbers come from ``numpy.random.default_rng([seed, index])``, it is drawn with PIL at
``SUPERSAMPLE`` times the size and box-filtered down (antialiased edges).

- background: a solid colour, a linear gradient between two colours, stripes (horizontal,
  vertical or diagonal) or axis-aligned checks;
- 1 to 3 shapes on top, each a circle, square, triangle, ring or bar, at a random position,
  size and rotation, in a saturated colour (backgrounds are drawn less saturated).

:func:`make_shapes` writes a flat folder of PNGs (the unconditional image-folder layout).
"""

from __future__ import annotations

import colorsys
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import StepdistillError

SUPERSAMPLE = 4
BACKGROUNDS = ("solid", "gradient", "stripes", "checks")
BACKGROUND_WEIGHTS = (0.35, 0.35, 0.15, 0.15)
SHAPES = ("circle", "square", "triangle", "ring", "bar")
SHAPE_COUNT_WEIGHTS = (0.5, 0.35, 0.15)  # 1, 2, 3 shapes


def _colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    """An RGB colour (floats in [0, 255]) from a uniform hue and saturation / value ranges."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb) * 255.0


def _background_colour(rng: np.random.Generator) -> np.ndarray:
    return _colour(rng, (0.0, 0.6), (0.15, 0.95))


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A float [side, side, 3] background in 0..255."""
    kind = BACKGROUNDS[rng.choice(len(BACKGROUNDS), p=BACKGROUND_WEIGHTS)]
    first, second = _background_colour(rng), _background_colour(rng)
    y, x = (np.mgrid[0:side, 0:side] + 0.5) / side  # pixel centres in [0, 1]
    if kind == "solid":
        mix = np.zeros((side, side))
    elif kind == "gradient":
        angle = rng.uniform(0.0, 2 * math.pi)
        along = (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle)
        mix = (along - along.min()) / (along.max() - along.min())
    elif kind == "stripes":
        angle = (0.0, 0.5, 0.25, 0.75)[rng.integers(4)] * math.pi  # horizontal, vertical, diagonals
        period = rng.uniform(0.2, 0.4)
        along = x * math.cos(angle) + y * math.sin(angle)
        mix = (np.floor(along / period + rng.uniform(0.0, 1.0)) % 2).astype(float)
    else:  # checks
        period = rng.uniform(0.2, 0.4)
        dx, dy = rng.uniform(0.0, 1.0, size=2)
        mix = ((np.floor(x / period + dx) + np.floor(y / period + dy)) % 2).astype(float)
    return first * (1.0 - mix[..., None]) + second * mix[..., None]


def _polygon(cx: float, cy: float, radius: float, angle: float, corners: int, stretch: float = 1.0) -> list[tuple[float, float]]:
    """Corners of a regular polygon (``stretch`` scales its first axis: a bar is a stretched square)."""
    points = []
    for k in range(corners):
        theta = 2 * math.pi * k / corners + math.pi / corners
        u, v = radius * math.cos(theta) * stretch, radius * math.sin(theta)
        points.append((cx + u * math.cos(angle) - v * math.sin(angle), cy + u * math.sin(angle) + v * math.cos(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int) -> None:
    kind = SHAPES[rng.integers(len(SHAPES))]
    colour = tuple(int(round(c)) for c in _colour(rng, (0.6, 1.0), (0.5, 1.0)))
    radius = rng.uniform(0.18, 0.35) * side
    cx, cy = rng.uniform(radius, side - radius, size=2)
    angle = rng.uniform(0.0, 2 * math.pi)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(1, round(radius * rng.uniform(0.3, 0.5))))
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, radius * 0.85, angle, 4), fill=colour)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, radius, angle, 3), fill=colour)
    else:  # bar: a long thin rectangle
        draw.polygon(_polygon(cx, cy, radius * 0.45, angle, 4, stretch=2.2), fill=colour)


def shapes_image(seed: int, index: int, size: int = 16) -> Image.Image:
    """Image ``index`` of seed ``seed``: an RGB ``size`` x ``size`` PIL image."""
    rng = np.random.default_rng([seed, index])
    side = size * SUPERSAMPLE
    canvas = Image.fromarray(np.clip(np.round(_background(rng, side)), 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(1 + rng.choice(len(SHAPE_COUNT_WEIGHTS), p=SHAPE_COUNT_WEIGHTS)):
        _draw_shape(draw, rng, side)
    return canvas.resize((size, size), resample=Image.BOX)


def _readme(folder: Path, num_images: int, seed: int, size: int) -> str:
    from .. import __version__

    return (
        f"# shapes: {num_images} procedural {size}x{size} RGB images, seed {seed}\n\n"
        f"Made by stepdistill {__version__}:\n\n"
        f"    stepdistill data shapes {folder} --num-images {num_images} --seed {seed} --size {size}\n\n"
        "Image i is `stepdistill.shapes.data.shapes_image(seed, i, size)`, saved as `{i:05d}.png`: coloured\n"
        "circles, squares, triangles, rings and bars on solid, gradient, striped or checked backgrounds.\n"
        "A flat folder: unconditional images (the image-folder layout of diffusers' training scripts).\n"
        "Benchmark conventions (docs/shapes.md): training folder and FD reference = seed 0, 10000 images;\n"
        "noise floor = fresh real images of seed 1 at the models' sample count.\n"
    )


def make_shapes(folder: str | os.PathLike, num_images: int = 10000, seed: int = 0, size: int = 16, overwrite: bool = False) -> Path:
    """Write ``num_images`` shapes images (``00000.png`` ...) and a ``README.md`` into ``folder``.

    Atomic: everything is written to a temporary sibling folder that is renamed into place at
    the end, so an interrupted call leaves nothing behind. A non-empty ``folder`` is refused
    unless ``overwrite``.
    """
    from ..atomic import atomic_directory

    if num_images < 1 or size < 1:
        raise StepdistillError(f"num_images and size must be positive; got {num_images}, {size}")
    folder = Path(folder)
    with atomic_directory(folder, overwrite=overwrite) as staging:
        digits = max(5, len(str(num_images - 1)))
        for index in range(num_images):
            shapes_image(seed, index, size).save(staging / f"{index:0{digits}d}.png")
        (staging / "README.md").write_text(_readme(folder, num_images, seed, size))
    return folder
