"""Atomic writes of whole directories: one helper for every folder the toolkit writes at once.

``with atomic_directory(folder) as staging:`` yields a temporary sibling folder; on a clean exit
it replaces ``folder`` (renamed into place; an old ``folder`` is renamed away first and removed
after), on an exception it is removed and ``folder`` is untouched. A crash in between leaves at
most a hidden ``.NAME.tmp-*`` sibling, never a half-written ``folder``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import StepdistillError


@contextlib.contextmanager
def atomic_directory(folder: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Stage the contents of ``folder`` and move them into place at the end (see the module).

    A non-empty existing ``folder`` is refused unless ``overwrite``; an existing file is refused.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StepdistillError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise StepdistillError(f"{folder} is not empty: choose another folder or pass --overwrite")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield staging
        if folder.is_dir():
            replaced = folder.with_name(staging.name + "-old")
            folder.rename(replaced)
            staging.rename(folder)
            shutil.rmtree(replaced)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` as a safetensors file atomically (a temporary sibling renamed into place),
    readable by everyone (safetensors itself creates files readable by the owner only)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, tmp, metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


__all__ = ["atomic_directory", "save_safetensors"]
