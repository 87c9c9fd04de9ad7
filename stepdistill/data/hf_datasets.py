"""``datasets`` datasets as ImageDatasets: a directory written by ``save_to_disk`` (a Dataset
or a DatasetDict), anything ``datasets.load_dataset`` reads locally (a folder of parquet / json /
csv / arrow files, or one such file), or a ``datasets.Dataset`` object.

``datasets`` is optional (``pip install datasets``). Its Arrow files stay memory-mapped: opening
costs next to nothing whatever the size, and rows are decoded only when ``images()`` asks.

Columns:

- image: ``image_column``, else the first ``datasets.Image`` feature; a named column may also
  hold encoded bytes (binary) or file paths (string);
- captions: ``caption_column``, else the first string column named text / caption / prompt;
- labels: ``label_column``, else the first ``ClassLabel`` feature, whose names become
  ``class_names`` (a named integer column has classes "0" .. "max").

Found captions win over found labels; name a column to choose. At open, ``PROBE_ITEMS`` evenly
spaced rows are inspected for mode and size (``verify`` adds PIL's ``verify``); a row that later
fails to decode is substituted like an unreadable file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import CAPTION_COLUMNS
from .cache import DEFAULT_CACHE_BYTES
from .decoded import DecodedImageDataset, probe_positions
from .pixels import read_header, unreadable_reason

LOAD_DATASET_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def require_datasets(purpose: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{purpose} needs the datasets package: pip install datasets") from None
    return datasets


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def pick_split(data, split: str | None, where: str):
    """(the Dataset, its split name or None) of a Dataset or DatasetDict; DatasetDicts default to "train"."""
    if isinstance(data, dict):  # DatasetDict is a dict of splits
        name = split or "train"
        if name not in data:
            raise DataError(f"{where} has no split {name!r} (splits: {', '.join(data)}); set data.split")
        return data[name], name
    if split not in (None, "train"):
        raise DataError(f"{where} is a single dataset without splits; split {split!r} does not apply")
    return data, None


def load_saved(path: Path, split: str | None):
    """(Dataset, description) of a save_to_disk directory, memory-mapped."""
    datasets = require_datasets(f"reading the datasets directory {path}")
    try:
        data = datasets.load_from_disk(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - a damaged directory: one line for the user
        raise DataError(f"cannot load the datasets directory {path}: {exc}".splitlines()[0]) from None
    dataset, name = pick_split(data, split, f"datasets directory {path}")
    return dataset, f"datasets directory {path}" + (f" (split {name})" if name else "")


def load_local(path: Path, split: str | None, expected: str):
    """(Dataset, description) of what ``datasets.load_dataset`` reads from a local file or folder;
    ``expected`` says in the error what else ``path`` could have been."""
    builder = LOAD_DATASET_BUILDERS.get(path.suffix.lower())
    if path.is_file() and builder is None:
        raise DataError(f"{path}: expected {expected}, or a {'/'.join(LOAD_DATASET_BUILDERS)} file for datasets.load_dataset")
    datasets = require_datasets(f"{path} is not {expected}; reading it with datasets.load_dataset")
    try:
        if path.is_file():
            data = datasets.load_dataset(builder, data_files=os.fspath(path))
        else:
            data = datasets.load_dataset(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - anything load_dataset cannot read: one line for the user
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path} is not {expected}, and datasets.load_dataset cannot read it: {reason}") from None
    dataset, name = pick_split(data, split, f"datasets.load_dataset({path})")
    return dataset, f"datasets.load_dataset {path}" + (f" (split {name})" if name else "")


STRING_TYPES = ("string", "large_string")


def choose_columns(features, image_column: str | None, caption_column: str | None, label_column: str | None,
                   source: str, datasets) -> tuple[str, str | None, str | None]:
    """(image, caption, label) columns: those named, else found by the rules above."""
    columns = ", ".join(features) or "none"
    for name in (image_column, caption_column, label_column):
        if name is not None and name not in features:
            raise DataError(f"{source} has no column {name!r} (columns: {columns})")
    if caption_column and label_column:
        raise DataError(f"{source}: a dataset has captions or labels, not both; name caption_column or label_column")
    image_column = image_column or next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    if image_column is None:
        raise DataError(f"{source} has no image column (columns: {columns}); it needs a datasets.Image feature, or name one with image_column")
    feature = features[image_column]
    if not isinstance(feature, datasets.Image) and getattr(feature, "dtype", None) not in ("binary", "large_binary", *STRING_TYPES):
        raise DataError(f"{source}: column {image_column!r} holds {feature}, not images, bytes or paths")
    if caption_column and getattr(features[caption_column], "dtype", None) not in STRING_TYPES:
        raise DataError(f"{source}: caption column {caption_column!r} holds {features[caption_column]}, not strings")
    if not caption_column and not label_column:
        caption_column = next((k for k in CAPTION_COLUMNS if getattr(features.get(k), "dtype", None) in STRING_TYPES), None)
    if not caption_column and not label_column:
        label_column = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    return image_column, caption_column, label_column


class HFImageDataset(DecodedImageDataset):
    """A ``datasets.Dataset`` with an image column and, optionally, captions or class labels."""

    unreadable_noun = "rows"

    def __init__(self, dataset, *, source: str = "datasets.Dataset", channels: int | None = None, resolution=None,
                 center_crop: bool = True, image_column: str | None = None, caption_column: str | None = None,
                 label_column: str | None = None, verify: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES):
        datasets = require_datasets("an image dataset from datasets")
        self.dataset = dataset
        self.image_column, self.caption_column, self.label_column = choose_columns(
            dataset.features, image_column, caption_column, label_column, source, datasets)
        self._image_rows = dataset.select_columns([self.image_column])
        if isinstance(dataset.features[self.image_column], datasets.Image):  # read the encoded bytes, decode ourselves
            self._image_rows = self._image_rows.cast_column(self.image_column, datasets.Image(decode=False))
        class_names = None
        if self.label_column is not None:
            class_names = self._read_labels(source)
        elif self.caption_column is not None:
            self._caption_rows = dataset.select_columns([self.caption_column])
        kind = "class" if self.label_column else "text" if self.caption_column else "unconditional"
        headers, unreadable = [], {}
        for index in probe_positions(len(dataset)):
            try:
                mode, size = read_header(self._open(index), verify=verify)
            except Exception as exc:  # noqa: BLE001 - any reader failure: the row is unreadable
                unreadable[index] = (self.item_id(index), unreadable_reason(exc))
                continue
            headers.append((self.item_id(index), mode, size))
        super().__init__(kind=kind, source=source, headers=headers, skipped=list(unreadable.values()), channels=channels,
                         resolution=resolution, center_crop=center_crop, cache_bytes=cache_bytes,
                         class_names=class_names, undecodable=unreadable)

    @property
    def cache_files(self) -> list[dict]:
        """The Arrow files the dataset is memory-mapped from (empty for an in-memory dataset)."""
        return self.dataset.cache_files

    def _read_labels(self, source: str) -> list[str]:
        """Every label, into memory (one int64 per row); returns the class names."""
        column, feature = self.label_column, self.dataset.features[self.label_column]
        values = self.dataset.select_columns([column]).with_format("numpy")[:][column]
        if not np.issubdtype(np.asarray(values).dtype, np.integer):
            raise DataError(f"{source}: label column {column!r} holds {feature}, not integer class labels")
        self._label_tensor = torch.from_numpy(np.asarray(values, dtype=np.int64))
        if len(values) and int(self._label_tensor.min()) < 0:
            row = int((self._label_tensor < 0).nonzero()[0])
            raise DataError(f"{source}: row {row} has no class label ({int(self._label_tensor[row])}) in column {column!r}")
        names = getattr(feature, "names", None)
        return list(names) if names else [str(i) for i in range(int(self._label_tensor.max()) + 1 if len(values) else 0)]

    def __len__(self) -> int:
        return len(self.dataset)

    def item_id(self, index: int) -> str:
        return f"row {index}"

    def _open(self, index: int):
        value = self._image_rows[index][self.image_column]
        if isinstance(value, dict):  # datasets.Image storage: {"bytes", "path"}
            value = value["bytes"] if value.get("bytes") is not None else value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return io.BytesIO(value)
        if isinstance(value, str):
            return value
        raise ValueError(f"no image in column {self.image_column!r}")

    def _labels(self, indices: list[int]) -> torch.Tensor:
        return self._label_tensor[indices]

    def _captions(self, indices: list[int]) -> list[str]:
        return [caption or "" for caption in self._caption_rows[indices][self.caption_column]]
