"""The text-to-image benchmark's data: procedural 32x32 RGB scenes with captions that state every
attribute of the scene (docs/t2i.md).

One object on a plain background. Its attributes, each drawn uniformly:

==========  =====================================================================
size        small, large
colour      red, green, blue, yellow, magenta, cyan
shape       circle, square, triangle
position    top left, top right, bottom left, bottom right (the quadrant of its centre)
background  black, white
==========  =====================================================================

The caption grammar (one sentence, lower case, nothing else)::

    a {size} {colour} {shape} in the {position} on a {background} background

e.g. ``a small red circle in the top left on a white background``; :func:`parse_caption` reads
it back into its attributes. Within an attribute value the scene still varies (the exact size,
the position inside the quadrant, a rotation of squares and triangles by up to 10 degrees, a
slight colour and brightness jitter), so a generator has more to learn than 288 templates.

Composition, not memorisation: the (colour, shape) pairs in :data:`HELDOUT_PAIRS` never appear
in the training split. The evaluation prompts of kind ``heldout`` use only those pairs (every
colour and every shape is seen, only not together); prompts of kind ``seen`` are the captions of
the test split, which has the training split's distribution.

Image ``index`` of seed ``seed`` is a pure function of ``(seed, index, split)``: its random
numbers come from ``numpy.random.default_rng([seed, split number, index])``; it is drawn with
PIL at ``SUPERSAMPLE`` times the size and box-filtered down (antialiased edges).
"""

from __future__ import annotations

import colorsys
import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import StepdistillError

SIZE = 32
SUPERSAMPLE = 4
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": ("small", "large"),
    "colour": ("red", "green", "blue", "yellow", "magenta", "cyan"),
    "shape": ("circle", "square", "triangle"),
    "position": ("top left", "top right", "bottom left", "bottom right"),
    "background": ("black", "white"),
}
HUES = {"red": 0.0, "yellow": 1 / 6, "green": 2 / 6, "cyan": 3 / 6, "blue": 4 / 6, "magenta": 5 / 6}
# (colour, shape) pairs that the training split never shows: held-out combinations
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("green", "square"), ("blue", "circle")})
SPLITS = {"train": 0, "test": 1, "heldout": 2}
CAPTION = "a {size} {colour} {shape} in the {position} on a {background} background"
_CAPTION_RE = re.compile(
    r"^a (?P<size>{}) (?P<colour>{}) (?P<shape>{}) in the (?P<position>{}) on a (?P<background>{}) background$".format(
        *("|".join(values) for values in ATTRIBUTES.values())
    )
)
# radius of the object as a fraction of the image side, per size value
RADIUS = {"small": (0.13, 0.16), "large": (0.21, 0.25)}
ROTATION_JITTER = math.radians(10)


@dataclass(frozen=True)
class Scene:
    size: str
    colour: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return CAPTION.format(**asdict(self))

    def labels(self) -> dict[str, int]:
        """The index of each attribute value (the attribute classifier's targets)."""
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes; a caption outside the grammar is an error that quotes it."""
    match = _CAPTION_RE.match(caption.strip())
    if match is None:
        raise StepdistillError(f"not a caption of the t2i grammar ({CAPTION!r}): {caption!r}")
    return Scene(**match.groupdict())


def all_scenes(heldout: bool | None = False) -> list[Scene]:
    """Every attribute combination: ``heldout=False`` the seen ones (288 - 48 = 240), ``True`` the
    held-out ones (48), ``None`` all 288."""
    scenes = [Scene(*values) for values in itertools.product(*ATTRIBUTES.values())]
    if heldout is None:
        return scenes
    return [s for s in scenes if ((s.colour, s.shape) in HELDOUT_PAIRS) == heldout]


def scene_for(seed: int, index: int, split: str = "train") -> Scene:
    """The attributes of image ``index``: uniform over the split's combinations (seen ones for
    train / test, held-out ones for heldout)."""
    scenes = all_scenes(heldout=split == "heldout")
    rng = np.random.default_rng([seed, SPLITS[split], index, 1])
    return scenes[int(rng.integers(len(scenes)))]


def _polygon(cx: float, cy: float, radius: float, angle: float, corners: int) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(angle + 2 * math.pi * k / corners), cy + radius * math.sin(angle + 2 * math.pi * k / corners))
            for k in range(corners)]


def render(scene: Scene, rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """Draw ``scene`` with the variation ``rng`` gives (exact size, place, rotation, colour jitter)."""
    side = size * SUPERSAMPLE
    level = rng.uniform(0, 40) if scene.background == "black" else rng.uniform(215, 255)
    canvas = Image.new("RGB", (side, side), tuple([int(level)] * 3))
    draw = ImageDraw.Draw(canvas)
    hue = (HUES[scene.colour] + rng.uniform(-0.025, 0.025)) % 1.0
    colour = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0)))
    radius = rng.uniform(*RADIUS[scene.size]) * side
    vertical, horizontal = scene.position.split()
    # the centre lies inside its quadrant, far enough from the midlines that the quadrant is clear
    cx = rng.uniform(0.27, 0.34) * side
    cy = rng.uniform(0.27, 0.34) * side
    if horizontal == "right":
        cx = side - cx
    if vertical == "bottom":
        cy = side - cy
    # squares stand on a side and triangles point up, each turned by at most ROTATION_JITTER: at any
    # rotation, 8,000 steps of a 1 M-parameter teacher averaged the orientations into four- and
    # three-lobed stars (shape accuracy 0.70 at 25 steps, w = 7.5; docs/t2i.md)
    jitter = rng.uniform(-ROTATION_JITTER, ROTATION_JITTER)
    if scene.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif scene.shape == "square":
        draw.polygon(_polygon(cx, cy, radius * 1.05, math.pi / 4 + jitter, 4), fill=colour)
    else:
        draw.polygon(_polygon(cx, cy, radius * 1.2, -math.pi / 2 + jitter, 3), fill=colour)
    return canvas.resize((size, size), resample=Image.BOX)


def t2i_image(seed: int, index: int, split: str = "train") -> tuple[Image.Image, Scene]:
    """Image ``index`` of ``split`` for ``seed`` and the scene it shows."""
    scene = scene_for(seed, index, split)
    return render(scene, np.random.default_rng([seed, SPLITS[split], index, 2])), scene


def eval_prompts(kind: str, count: int, seed: int = 0) -> list[str]:
    """``count`` evaluation prompts: ``seen`` are the captions of test-split images 0..count-1
    (the training distribution); ``heldout`` are captions of held-out (colour, shape) pairs."""
    if kind not in ("seen", "heldout"):
        raise StepdistillError(f"prompt kind must be 'seen' or 'heldout'; got {kind!r}")
    split = "test" if kind == "seen" else "heldout"
    return [scene_for(seed, i, split).caption for i in range(count)]


DEFAULT_COUNTS = {"train": 10000, "test": 2000, "heldout": 500}


def _readme(folder: Path, counts: dict[str, int], seed: int) -> str:
    from .. import __version__

    lines = [
        f"# t2i: procedural captioned {SIZE}x{SIZE} RGB scenes, seed {seed}",
        "",
        f"Made by stepdistill {__version__}:",
        "",
        f"    stepdistill data t2i {folder} --seed {seed}" + "".join(f" --{k}-images {v}" for k, v in counts.items()),
        "",
        "Each split is an image folder in the layout of diffusers' text-to-image training scripts:",
        "`metadata.jsonl` lines with `file_name` and `text` (plus one column per attribute).",
        "",
        f"Caption grammar: `{CAPTION}`",
        "",
        *[f"- {name}: {', '.join(values)}" for name, values in ATTRIBUTES.items()],
        "",
        "Held-out (colour, shape) pairs, never in train/ or test/: "
        + ", ".join(f"{c} {s}" for c, s in sorted(HELDOUT_PAIRS)) + " (only in heldout/).",
        "See docs/t2i.md.",
        "",
    ]
    return "\n".join(lines)


def make_t2i(folder: str | os.PathLike, counts: dict[str, int] | None = None, seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``folder/{train,test,heldout}/`` (PNG images + ``metadata.jsonl``) and a README.md.

    Atomic (one temporary sibling folder renamed into place). A non-empty ``folder`` is refused
    unless ``overwrite``.
    """
    from ..atomic import atomic_directory

    counts = {**DEFAULT_COUNTS, **(counts or {})}
    if any(v < 0 for v in counts.values()) or counts["train"] < 1:
        raise StepdistillError(f"image counts must be >= 0 (train >= 1); got {counts}")
    folder = Path(folder)
    with atomic_directory(folder, overwrite=overwrite) as staging:
        for split, count in counts.items():
            if count == 0:
                continue
            directory = staging / split
            directory.mkdir()
            with open(directory / "metadata.jsonl", "w", encoding="utf-8") as meta:
                for index in range(count):
                    image, scene = t2i_image(seed, index, split)
                    name = f"{index:05d}.png"
                    image.save(directory / name)
                    meta.write(json.dumps({"file_name": name, "text": scene.caption, **asdict(scene)}) + "\n")
        (staging / "README.md").write_text(_readme(folder, counts, seed))
    return folder


__all__ = [
    "ATTRIBUTES", "CAPTION", "HELDOUT_PAIRS", "SIZE", "Scene", "all_scenes", "eval_prompts", "make_t2i", "parse_caption",
    "render", "scene_for", "t2i_image",
]
