"""A least-recently-used cache of decoded image tensors, capped by their total size in bytes, so
that a small dataset is decoded once and a large one streams."""

from __future__ import annotations

from collections import OrderedDict

import torch

DEFAULT_CACHE_BYTES = 512 * 2**20


class TensorLRU:
    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: int) -> torch.Tensor | None:
        tensor = self._items.get(key)
        if tensor is not None:
            self._items.move_to_end(key)
        return tensor

    def put(self, key: int, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = tensor
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.nbytes -= evicted.numel() * evicted.element_size()
