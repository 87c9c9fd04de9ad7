"""``DecodedImageDataset``: the shared machinery of datasets whose items are encoded images
(files in a folder, rows of an Arrow table): format settling at open, decoding on demand into a
capped LRU cache, and deterministic substitution of items that fail to decode.

Format: the dataset's channel count is 3 when any inspected image has a colour mode, else 1
(grey images of a colour dataset are expanded to RGB). Its size is ``resolution`` (an int for
square images or (H, W)); ``None`` means the images' own size, which all inspected images must
share.

An item that fails to decode in ``images()`` is replaced by the next readable item (index + 1,
wrapping), recorded in ``skipped`` and warned about once; its label or caption stays its own, so
``labels()`` / ``captions()`` depend only on the indices.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Iterable

import torch

from ..errors import DataError
from .base import ImageDataset
from .cache import DEFAULT_CACHE_BYTES, TensorLRU
from .pixels import decode, native_channels, unreadable_reason

PROBE_ITEMS = 16  # images inspected at open when not every one is


def probe_positions(count: int, limit: int = PROBE_ITEMS) -> list[int]:
    """Up to ``limit`` evenly spaced positions in ``range(count)``, first and last included."""
    if count <= limit:
        return list(range(count))
    return sorted({round(k * (count - 1) / (limit - 1)) for k in range(limit)})


def parse_resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """``resolution`` as (H, W)."""
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise DataError(f"resolution must be a positive int or (height, width); got {resolution!r}")
    return size


def settle_format(headers: list[tuple[str, str, tuple[int, int]]], channels: int | None,
                  resolution: int | tuple[int, int] | None, where: str) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of a dataset from its inspected items ``(id, mode, (width, height))``."""
    if channels is not None and channels not in (1, 3):
        raise DataError(f"images can be read with 1 or 3 channels; the teacher takes {channels}")
    native = 3 if any(native_channels(mode) == 3 for _, mode, _ in headers) else 1
    if channels is not None and channels != native:
        mode = next(mode for _, mode, _ in headers if native_channels(mode) == native)
        plural = "s" if native > 1 else ""
        raise DataError(
            f"images in {where} have {native} channel{plural} (mode {mode}) but the teacher takes {channels}; "
            f"convert them to {'RGB' if channels == 3 else 'grey (L)'} or use a {native}-channel teacher"
        )
    if resolution is not None:
        return native, parse_resolution(resolution)
    first_of_size: dict[tuple[int, int], str] = {}
    for item, _, size in headers:
        first_of_size.setdefault(size, item)
    if len(first_of_size) > 1:
        (a, item_a), (b, item_b) = list(first_of_size.items())[:2]
        raise DataError(
            f"images in {where} have different sizes ({item_a} is {a[0]}x{a[1]}, {item_b} is {b[0]}x{b[1]}); "
            "set data.resolution to resize them to one size"
        )
    (width, height), = first_of_size
    return native, (height, width)


class DecodedImageDataset(ImageDataset):
    """Subclasses list their items, inspect some or all of them (``headers``: (id, mode,
    (width, height)); ``skipped``: the unreadable ones, of which those still among the items are
    ``undecodable``), and implement ``item_id(index)`` and ``_open(index)``."""

    def __init__(self, *, kind: str, source: str, headers: list[tuple[str, str, tuple[int, int]]],
                 skipped: list[tuple[str, str]], channels: int | None, resolution, center_crop: bool,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, class_names: list[str] | None = None,
                 undecodable: Iterable[int] = ()):
        if not headers:
            if not skipped:
                raise DataError(f"{source} holds no readable images (it is empty)")
            listed = ", ".join(f"{name}: {reason}" for name, reason in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            raise DataError(f"{source} holds no readable images ({len(skipped)} unreadable: {listed})")
        channels, (height, width) = settle_format(headers, channels, resolution, source)
        super().__init__(kind=kind, channels=channels, height=height, width=width, source=source,
                         class_names=class_names, skipped=skipped)
        self.center_crop = center_crop
        self._cache = TensorLRU(cache_bytes)
        self._undecodable = set(undecodable)  # indices known to fail (already in skipped)
        self._warned = False

    @abstractmethod
    def item_id(self, index: int) -> str:
        """The file name or row id that ``skipped`` and messages show."""

    @abstractmethod
    def _open(self, index: int):
        """What PIL's ``Image.open`` reads for item ``index``."""

    def images(self, indices, flips: torch.Tensor | None = None) -> torch.Tensor:
        items = list(map(self._pixels, self.index_list(indices)))  # no frame of its own: stacklevel holds
        batch = torch.stack(items) if items else torch.empty(0, self.channels, self.height, self.width, dtype=torch.uint8)
        return self.apply_flips(batch.float() / 127.5 - 1.0, flips)

    def _pixels(self, index: int) -> torch.Tensor:
        """uint8 [C, H, W] of item ``index`` or, if it cannot be decoded, of its substitute."""
        pixels = self._cache.get(index)
        if pixels is not None:
            return pixels
        candidate = index
        for _ in range(len(self)):
            if candidate not in self._undecodable:
                try:
                    pixels = decode(self._open(candidate), self.channels, (self.height, self.width), self.center_crop)
                    break
                except Exception as exc:  # noqa: BLE001 - any decoder failure: a bad file must not end a run
                    self._record_undecodable(candidate, unreadable_reason(exc))
            candidate = (candidate + 1) % len(self)
        else:
            raise DataError(f"{self.source}: none of its {len(self)} images can be decoded")
        self._cache.put(index, pixels)
        return pixels

    def _record_undecodable(self, index: int, reason: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.source}: cannot decode {self.item_id(index)} ({reason}); the next readable image stands in "
                "for it (this and any further such items are listed in .skipped)",
                RuntimeWarning,
                stacklevel=4,
            )
        self._undecodable.add(index)
        self.skipped.append((self.item_id(index), reason))
