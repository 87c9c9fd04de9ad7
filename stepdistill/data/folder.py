"""Image folders, in the layouts of diffusers' training scripts and of the ``datasets``
"imagefolder" builder:

- **flat**: images directly in the folder -> kind ``"unconditional"``;
- **class sub-folders**: ``root/<class>/<image>`` (images may sit deeper inside a class folder)
  -> kind ``"class"``; the sorted names of the sub-folders that hold images are ``class_names``
  and an image's label is the position of its sub-folder. Images directly in the root next to
  class folders are ambiguous (an error);
- **captions**: ``root/metadata.jsonl`` with one JSON object per line, ``file_name`` (relative to
  the root, may include sub-folders) and ``text`` (or ``caption`` / ``prompt``, or the key named
  by ``caption_column``) -> kind ``"text"``; only the files it lists are used.

Image files end in .png .jpg .jpeg .webp .bmp or .gif (first frame), in any letter case; names
starting with "." are ignored. Items are in sorted order of their path relative to the root.

With ``verify`` every file's header is checked at open (PIL ``open`` + ``verify``: no pixel
decoding) and unreadable files are left out and listed in ``skipped``; without it, only
``PROBE_ITEMS`` evenly spaced files are inspected for mode and size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import DataError
from .base import CAPTION_COLUMNS
from .cache import DEFAULT_CACHE_BYTES
from .decoded import DecodedImageDataset, probe_positions
from .pixels import IMAGE_SUFFIXES, read_header, unreadable_reason

METADATA_FILE = "metadata.jsonl"


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def images_under(folder: Path, root: Path) -> list[str]:
    """Sorted paths (relative to ``root``, "/"-separated) of the image files anywhere under ``folder``."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found += [(Path(directory) / name).relative_to(root).as_posix() for name in files if is_image_file(name)]
    return sorted(found)


def is_image_folder(path: Path) -> bool:
    """Whether ``path`` holds a metadata.jsonl or any image file (stops at the first one)."""
    if (path / METADATA_FILE).is_file():
        return True
    for _, subdirs, files in os.walk(path):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        if any(is_image_file(name) for name in files):
            return True
    return False


def read_metadata(path: Path, caption_column: str | None) -> list[tuple[str, str]]:
    """(file_name, caption) of each line of a metadata.jsonl, sorted by file_name."""
    keys = (caption_column,) if caption_column else CAPTION_COLUMNS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}".splitlines()[0]) from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise DataError(f"{path}:{number}: expected an object with a file_name string")
        caption = next((record[k] for k in keys if isinstance(record.get(k), str)), None)
        if caption is None:
            raise DataError(f"{path}:{number}: expected a {'/'.join(keys)} string next to file_name")
        items.append((record["file_name"], caption))
    return sorted(items, key=lambda item: item[0])


class FolderLayout(NamedTuple):
    kind: str
    description: str
    items: list[tuple[str, object]]  # (path relative to the root, label / caption / None)
    class_names: list[str] | None


def find_layout(root: Path, caption_column: str | None) -> FolderLayout:
    if (root / METADATA_FILE).is_file():
        return FolderLayout("text", "captions from metadata.jsonl", read_metadata(root / METADATA_FILE, caption_column), None)
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    root_images = [e.name for e in entries if e.is_file() and is_image_file(e.name)]
    classes = {}
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith("."):
            files = images_under(Path(entry.path), root)
            if files:
                classes[entry.name] = files
    if classes and root_images:
        raise DataError(
            f"image folder {root} is ambiguous: it has class sub-folders ({', '.join(list(classes)[:3])}) and images "
            f"directly in it ({', '.join(root_images[:3])}); move the images into a class folder or the folders away"
        )
    if classes:
        items = [(path, label) for label, files in enumerate(classes.values()) for path in files]
        return FolderLayout("class", "class sub-folders", items, list(classes))
    return FolderLayout("unconditional", "flat", [(name, None) for name in root_images], None)


class ImageFolderDataset(DecodedImageDataset):
    """A folder of image files in one of the layouts above."""

    def __init__(self, root: str | os.PathLike, *, channels: int | None = None, resolution=None, center_crop: bool = True,
                 caption_column: str | None = None, verify: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        layout = find_layout(self.root, caption_column)
        items = layout.items
        headers, unreadable = [], {}
        for position in range(len(items)) if verify else probe_positions(len(items)):
            name = items[position][0]
            try:
                mode, size = read_header(self.root / name, verify=verify)
            except Exception as exc:  # noqa: BLE001 - any reader failure: the file is unreadable
                unreadable[position] = (name, unreadable_reason(exc))
                continue
            headers.append((name, mode, size))
        if verify:  # unreadable files are left out; without verify they stay and are substituted
            items = [item for position, item in enumerate(items) if position not in unreadable]
        self._files = [name for name, _ in items]
        self._conditions = [condition for _, condition in items]
        super().__init__(kind=layout.kind, source=f"image folder {self.root} ({layout.description})", headers=headers,
                         skipped=list(unreadable.values()), channels=channels, resolution=resolution,
                         center_crop=center_crop, cache_bytes=cache_bytes, class_names=layout.class_names,
                         undecodable=() if verify else unreadable)
        if self.kind == "class":
            self._label_tensor = torch.tensor(self._conditions, dtype=torch.long)

    def __len__(self) -> int:
        return len(self._files)

    def item_id(self, index: int) -> str:
        return self._files[index]

    def _open(self, index: int) -> Path:
        return self.root / self._files[index]

    def _labels(self, indices: list[int]) -> torch.Tensor:
        return self._label_tensor[indices]

    def _captions(self, indices: list[int]) -> list[str]:
        return [self._conditions[i] for i in indices]
