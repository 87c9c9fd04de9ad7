"""``ImageDataset``: the one interface every image source of a recipe presents.

A dataset has one *kind*:

- ``"unconditional"``: images only;
- ``"class"``: each image has a label in ``0 .. num_classes - 1``, named by ``class_names``;
- ``"text"``: each image has a caption.

``images(indices, flips)`` returns float32 ``[B, C, H, W]`` in ``[-1, 1]``. Everything a dataset
returns depends only on the indices (and the flips, which the caller draws from its seeded
generator), so training is reproducible and identical on every process.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod

import torch

from ..errors import DataError

KINDS = ("unconditional", "class", "text")
CAPTION_COLUMNS = ("text", "caption", "prompt")  # caption keys / columns, in order of preference


class ImageDataset(ABC):
    kind: str
    channels: int
    height: int
    width: int
    class_names: list[str] | None
    skipped: list[tuple[str, str]]  # (file or row id, reason) of unreadable items skipped so far
    source: str  # a human description, e.g. "image folder /x (flat)"
    unreadable_noun = "files"

    def __init__(self, *, kind: str, channels: int, height: int, width: int, source: str,
                 class_names: list[str] | None = None, skipped: list[tuple[str, str]] | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
        if (kind == "class") != (class_names is not None):
            raise ValueError("class_names is given exactly when kind is 'class'")
        self.kind = kind
        self.channels, self.height, self.width = channels, height, width
        self.source = source
        self.class_names = list(class_names) if class_names is not None else None
        self.skipped = list(skipped or [])

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def images(self, indices, flips: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [B, C, H, W] in [-1, 1]; ``flips``: bool [B], a horizontal flip per item."""

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names is not None else None

    def labels(self, indices) -> torch.Tensor:
        """int64 [B] class labels (class kind only)."""
        if self.kind != "class":
            raise DataError(f"{self.source} has no class labels (its kind is {self.kind})")
        return self._labels(self.index_list(indices))

    def captions(self, indices) -> list[str]:
        """One caption per index (text kind only)."""
        if self.kind != "text":
            raise DataError(f"{self.source} has no captions (its kind is {self.kind})")
        return self._captions(self.index_list(indices))

    def conditions(self, indices) -> torch.Tensor | list[str] | None:
        """Labels, captions or None, by kind."""
        if self.kind == "class":
            return self.labels(indices)
        if self.kind == "text":
            return self.captions(indices)
        return None

    def summary(self) -> str:
        """One line: source, size, kind, classes, resolution, unreadable items skipped."""
        if self.kind == "class":
            names = ", ".join(self.class_names[:5]) + (", ..." if self.num_classes > 5 else "")
            kind = f"class-conditional ({self.num_classes} classes: {names})"
        else:
            kind = "captioned" if self.kind == "text" else "unconditional"
        line = f"{self.source}: {len(self):,} images, {kind}, {self.channels}x{self.height}x{self.width}"
        if self.skipped:
            names = ", ".join(name for name, _ in self.skipped[:3]) + (", ..." if len(self.skipped) > 3 else "")
            line += f"; {len(self.skipped)} unreadable {self.unreadable_noun} skipped ({names})"
        return line

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.summary()}>"

    def index_list(self, indices) -> list[int]:
        """``indices`` (a sequence or an integer tensor) as a list of ints in range."""
        if isinstance(indices, torch.Tensor):
            indices = indices.reshape(-1).tolist()
        result = [operator.index(i) for i in indices]
        size = len(self)
        for i in result:
            if not 0 <= i < size:
                raise IndexError(f"index {i} is out of range for {self.source} ({size} images)")
        return result

    @staticmethod
    def apply_flips(images: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        """Flip ``images[b]`` horizontally where ``flips[b]`` (in place; returns ``images``)."""
        if flips is None:
            return images
        flips = torch.as_tensor(flips, dtype=torch.bool).to(images.device)
        if flips.shape != (images.shape[0],):
            raise ValueError(f"flips must be a bool tensor of shape [{images.shape[0]}]; got {tuple(flips.shape)}")
        images[flips] = images[flips].flip(-1)
        return images

    def _labels(self, indices: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def _captions(self, indices: list[int]) -> list[str]:
        raise NotImplementedError
