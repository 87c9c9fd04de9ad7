"""Tensor shards: row-aligned tensors (VAE latents, text embeddings, labels) that may be larger
than memory, written as safetensors shards and read back a few rows at a time.

A shard directory::

    index.json               {"num_rows": N,
                              "keys": {key: {"shape": [trailing dims], "dtype": "float16"}, ...},
                              "shards": [{"file": "shard-00000.safetensors", "rows": n0}, ...],
                              "metadata": {...}}
    shard-00000.safetensors  rows 0 .. n0-1 of every key
    shard-00001.safetensors  ...

A single ``.safetensors`` file whose tensors share their first dimension (the earlier one-file
latent caches) reads as one shard; its string metadata becomes ``metadata``.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import DataError

INDEX_FILE = "index.json"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ShardWriter:
    """Write rows into a new shard directory, atomically: the shards are built in a hidden temporary
    sibling and renamed to ``directory`` by ``close()``; an exception inside ``with ShardWriter(...)``
    leaves nothing behind. Every ``add`` has the same keys, trailing shapes and dtypes.
    ``metadata`` (JSON-serialisable) may be updated until ``close``."""

    def __init__(self, directory: str | os.PathLike, shard_rows: int = 4096, metadata: dict | None = None):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be at least 1; got {shard_rows}")
        self.directory = Path(directory)
        if self.directory.exists() and not (self.directory.is_dir() and not any(self.directory.iterdir())):
            raise DataError(f"{self.directory} already exists; remove it or write the tensors elsewhere")
        self.shard_rows = shard_rows
        self.metadata = dict(metadata or {})
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.", suffix=".tmp", dir=self.directory.parent))
        self._spec: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._pending_rows = 0
        self._shards: list[dict] = []
        self._closed = False

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, **tensors: torch.Tensor) -> None:
        """Append rows: each tensor is a batch along dim 0, all with the same number of rows."""
        if self._closed:
            raise RuntimeError("the ShardWriter is closed")
        if not tensors:
            raise ValueError("add() needs at least one tensor")
        rows = {t.shape[0] for t in tensors.values()}
        if len(rows) != 1:
            raise ValueError(f"tensors of one add() must have the same number of rows; got {sorted(rows)}")
        spec = {k: (tuple(t.shape[1:]), t.dtype) for k, t in tensors.items()}
        if self._spec is None:
            self._spec = spec
            self._pending = {k: [] for k in spec}
        elif spec != self._spec:
            raise ValueError(f"add() got {self._describe(spec)}; earlier rows have {self._describe(self._spec)}")
        for key, tensor in tensors.items():
            self._pending[key].append(tensor.detach().cpu().contiguous())
        self._pending_rows += rows.pop()
        while self._pending_rows >= self.shard_rows:
            self._write_shard(self.shard_rows)

    def close(self) -> Path:
        """Write the last shard and index.json, move the directory into place; returns its path."""
        if self._closed:
            return self.directory
        try:
            if self._pending_rows:
                self._write_shard(self._pending_rows)
            index = {
                "num_rows": sum(s["rows"] for s in self._shards),
                "keys": {k: {"shape": list(shape), "dtype": _dtype_name(dtype)} for k, (shape, dtype) in (self._spec or {}).items()},
                "shards": self._shards,
                "metadata": self.metadata,
            }
            (self._tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
            if self.directory.exists():  # an empty directory, checked at __init__
                self.directory.rmdir()
            os.rename(self._tmp, self.directory)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.directory

    def abort(self) -> None:
        """Discard everything written so far."""
        self._closed = True
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _write_shard(self, rows: int) -> None:
        joined = {k: torch.cat(chunks) for k, chunks in self._pending.items()}
        name = f"shard-{len(self._shards):05d}.safetensors"
        save_file({k: v[:rows].contiguous() for k, v in joined.items()}, os.fspath(self._tmp / name))
        self._shards.append({"file": name, "rows": rows})
        self._pending = {k: [v[rows:]] for k, v in joined.items()}
        self._pending_rows -= rows

    @staticmethod
    def _describe(spec) -> str:
        return ", ".join(f"{k} [N, {', '.join(map(str, shape))}] {_dtype_name(dtype)}" for k, (shape, dtype) in spec.items())


class ShardedTensors:
    """Rows of a shard directory (or of one legacy ``.safetensors`` file), read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            self._open_directory()
        elif self.path.is_file() and self.path.suffix == ".safetensors":
            self._open_single_file()
        elif self.path.exists():
            raise DataError(f"{self.path} is neither a tensor shard directory (with {INDEX_FILE}) nor a .safetensors file")
        else:
            raise DataError(f"tensor cache not found: {self.path}")
        self._starts = [0, *itertools.accumulate(self._rows)]

    def _open_directory(self) -> None:
        try:
            index = json.loads((self.path / INDEX_FILE).read_text())
            keys, shards = index["keys"], index["shards"]
            self._files = [self.path / s["file"] for s in shards]
            self._rows = [int(s["rows"]) for s in shards]
            self._trailing = {k: tuple(v["shape"]) for k, v in keys.items()}
            self._dtypes = {k: getattr(torch, v["dtype"]) for k, v in keys.items()}
            self.metadata = index.get("metadata", {})
            consistent = sum(self._rows) == index["num_rows"]
        except FileNotFoundError:
            raise DataError(f"{self.path} is not a tensor shard directory: no {INDEX_FILE}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{self.path / INDEX_FILE} is damaged: {exc!r}".splitlines()[0]) from None
        if not consistent:
            raise DataError(f"{self.path / INDEX_FILE} is damaged: its shards do not add up to num_rows")
        self.keys = list(self._trailing)

    def _open_single_file(self) -> None:
        try:
            with safe_open(os.fspath(self.path), framework="pt") as f:
                self.keys = list(f.keys())
                shapes = {k: f.get_slice(k).get_shape() for k in self.keys}
                first_dims = {shape[0] if shape else None for shape in shapes.values()}
                if len(first_dims) > 1 or None in first_dims:
                    listed = ", ".join(f"{k} {list(s)}" for k, s in shapes.items())
                    raise DataError(f"{self.path}: the tensors must share their first dimension (rows); got {listed}")
                self._dtypes = {k: f.get_slice(k)[0:0].dtype for k in self.keys}
                self.metadata = dict(f.metadata() or {})
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file: one line for the user
            raise DataError(f"cannot read {self.path}: {exc}".splitlines()[0]) from None
        self._files = [self.path]
        self._rows = list(first_dims)
        self._trailing = {k: tuple(s[1:]) for k, s in shapes.items()}

    def __len__(self) -> int:
        return self._starts[-1]

    def shape(self, key: str) -> tuple[int, ...]:
        """(rows, *trailing dims) of ``key``."""
        return (len(self), *self._trailing[self._check_key(key)])

    def get(self, key: str, indices) -> torch.Tensor:
        """Rows ``indices`` of ``key`` in that order (repeats allowed). Only those rows are read:
        one ``get_slice`` range per contiguous run of rows within a shard."""
        self._check_key(key)
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"row indices must be in [0, {len(self)}); got {int(indices.min())} .. {int(indices.max())}")
        wanted, order = torch.unique(indices, sorted=True, return_inverse=True)
        parts = [torch.empty(0, *self._trailing[key], dtype=self._dtypes[key])]
        for shard, rows in itertools.groupby(wanted.tolist(), key=self._shard_of):
            start = self._starts[shard]
            with safe_open(os.fspath(self._files[shard]), framework="pt") as f:
                rows_slice = f.get_slice(key)
                for first, last in _runs(row - start for row in rows):
                    parts.append(rows_slice[first : last + 1])
        return torch.cat(parts)[order]

    def _shard_of(self, row: int) -> int:
        return bisect.bisect_right(self._starts, row) - 1

    def _check_key(self, key: str) -> str:
        if key not in self._trailing:
            raise KeyError(f"{self.path} has no {key!r} (keys: {', '.join(self.keys)})")
        return key


def _runs(sorted_rows) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive integers in ``sorted_rows``."""
    runs: list[tuple[int, int]] = []
    for row in sorted_rows:
        if runs and row == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], row)
        else:
            runs.append((row, row))
    return runs
