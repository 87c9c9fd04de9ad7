"""``open_images``: any image source a recipe can name, as an ImageDataset.

Tried in this order:

1. a registered dataset name (``register_dataset``, or an entry point in the group
   ``stepdistill.datasets``);
2. a directory written by ``datasets``' ``save_to_disk`` (``split`` picks from a DatasetDict,
   default "train") -> ``HFImageDataset``, memory-mapped;
3. an image folder (flat, class sub-folders or metadata.jsonl captions; see ``folder.py``)
   -> ``ImageFolderDataset``;
4. any other file or directory ``datasets.load_dataset`` reads locally (parquet, json, csv,
   arrow) -> ``HFImageDataset``.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from ..errors import DataError
from .base import ImageDataset
from .cache import DEFAULT_CACHE_BYTES
from .decoded import parse_resolution
from .folder import ImageFolderDataset, is_image_folder
from .hf_datasets import HFImageDataset, is_saved_dataset, load_local, load_saved
from .pixels import IMAGE_SUFFIXES
from .registry import dataset_factory, registered_datasets

EXPECTED = f"an image folder ({' '.join(IMAGE_SUFFIXES)} files, class sub-folders or a metadata.jsonl) or a datasets save_to_disk directory"


def open_images(spec: str | os.PathLike, *, channels: int | None = None, resolution: int | tuple[int, int] | None = None,
                center_crop: bool = True, image_column: str | None = None, caption_column: str | None = None,
                label_column: str | None = None, split: str | None = None, verify: bool = True,
                cache_bytes: int = DEFAULT_CACHE_BYTES) -> ImageDataset:
    """Open ``spec`` (a registered name or a path) as an ImageDataset.

    ``channels``: what the teacher takes (a different native channel count is an error);
    ``resolution``: int or (H, W), images resized (shorter side, bicubic) then centre-cropped,
    or plainly resized with ``center_crop=False``; None keeps the images' own (common) size.
    ``image_column`` / ``caption_column`` / ``label_column`` / ``split``: for ``datasets``
    datasets (``caption_column`` also names the caption key of a metadata.jsonl).
    ``verify``: check every image file's header at open and skip unreadable ones.
    ``cache_bytes``: cap of the in-memory cache of decoded images.
    """
    columns = dict(image_column=image_column, caption_column=caption_column, label_column=label_column)
    common = dict(channels=channels, resolution=resolution, center_crop=center_crop, verify=verify, cache_bytes=cache_bytes)
    if isinstance(spec, str):
        factory = dataset_factory(spec)
        if factory is not None:
            return _open_registered(spec, factory, {**common, **columns, "split": split})
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(registered_datasets()) or "none"
        raise DataError(f"{spec}: no such file or directory, and not a registered dataset name (registered: {names})")
    if path.is_dir() and is_saved_dataset(path):
        dataset, source = load_saved(path, split)
        return HFImageDataset(dataset, source=source, **columns, **common)
    if path.is_dir() and is_image_folder(path):
        return ImageFolderDataset(path, caption_column=caption_column, **common)
    if path.is_dir() and not any(not entry.name.startswith(".") for entry in os.scandir(path)):
        raise DataError(f"image folder {path} holds no readable images (it is empty)")
    dataset, source = load_local(path, split, expected=EXPECTED)
    return HFImageDataset(dataset, source=source, **columns, **common)


def _open_registered(name: str, factory, options: dict) -> ImageDataset:
    """``factory(**options it accepts)``, checked against the channels and resolution asked for."""
    parameters = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        dataset = factory(**options)
    else:
        dataset = factory(**{k: v for k, v in options.items() if k in {p.name for p in parameters}})
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"the factory of dataset {name!r} returned {type(dataset).__name__}, not an ImageDataset")
    channels, resolution = options["channels"], options["resolution"]
    if channels is not None and dataset.channels != channels:
        raise DataError(f"images in dataset {name!r} have {dataset.channels} channel(s) but the teacher takes {channels}")
    if resolution is not None and (dataset.height, dataset.width) != parse_resolution(resolution):
        height, width = parse_resolution(resolution)
        raise DataError(f"dataset {name!r} is {dataset.height}x{dataset.width} and cannot be resized to {height}x{width}")
    return dataset

