"""Atomic writes: the one place the toolkit makes files and folders appear whole or not at all.

``with atomic_file(path) as tmp:`` yields a temporary sibling path with the same suffix (writers
that pick a format from it, PIL and matplotlib, keep working); on a clean exit it replaces
``path``, on an exception it is removed. :func:`write_text`, :func:`write_json` and
:func:`save_safetensors` are built on it.

``with atomic_directory(folder) as staging:`` yields a temporary sibling folder; on a clean exit
it replaces ``folder`` (renamed into place; an old ``folder`` is renamed away first and removed
after), on an exception it is removed and ``folder`` is untouched. A crash in between leaves at
most hidden ``.NAME.partial-*`` / ``.NAME.old-*`` siblings (:func:`remove_partial` clears them),
never a half-written ``folder``. Exports, datasets and teacher exports use it. Two writers keep
their own rename, for a reason: checkpoints (accelerate's ``save_state`` writes from every
process into a folder the main process renames after a barrier) and the streamed latent-shard
writer (a folder filled over a long loop, with an explicit ``abort``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputDirError


@contextlib.contextmanager
def atomic_directory(folder: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Stage the contents of ``folder`` and move them into place at the end (see the module).

    A non-empty existing ``folder`` is refused unless ``overwrite``; an existing file is refused.
    The staging folder (``.NAME.partial-*``) gets the mode ``mkdir`` would give; an existing
    ``folder`` is moved aside (``.NAME.old-*``) and removed only once the new one is in place.
    """
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"output directory {folder} exists and is not a directory")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputDirError(f"output directory {folder} is not empty (pass overwrite=True / --overwrite to replace it)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private
        yield staging
        _replace_directory(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_partial(directory: str | os.PathLike) -> None:
    """Delete what an :func:`atomic_directory` killed mid-write left in ``directory``:
    ``.NAME.partial-*`` (never renamed into place) and ``.NAME.old-*`` (the folder it replaced)."""
    for leftover in [*Path(directory).glob(".*.partial-*"), *Path(directory).glob(".*.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _replace_directory(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is removed only once ``new`` is in place."""
    if not out.exists():
        os.rename(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old / out.name, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write (see the module); replaces ``path`` at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return os.fspath(path)


def write_json(path: str | os.PathLike, data) -> str:
    """Write ``data`` as indented JSON (newline-terminated) to ``path`` atomically."""
    import json

    return write_text(path, json.dumps(data, indent=2) + "\n")


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` as a safetensors file atomically, readable by everyone (safetensors
    itself creates files readable by the owner only)."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, os.fspath(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)
    return os.fspath(path)


__all__ = ["atomic_directory", "atomic_file", "remove_partial", "save_safetensors", "write_json", "write_text"]
