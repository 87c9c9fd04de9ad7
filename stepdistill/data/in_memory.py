"""``TensorImageDataset``: images already in memory as one tensor (a small benchmark, a test)."""

from __future__ import annotations

import torch

from .base import ImageDataset


class TensorImageDataset(ImageDataset):
    """``images``: [N, C, H, W] in [-1, 1]; with ``labels`` (int [N]) and ``class_names`` it is of
    the class kind, with ``captions`` (N strings) of the text kind, else unconditional."""

    def __init__(self, images: torch.Tensor, *, labels: torch.Tensor | None = None, class_names: list[str] | None = None,
                 captions: list[str] | None = None, source: str = "in-memory images"):
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W]; got shape {tuple(images.shape)}")
        if (labels is None) != (class_names is None):
            raise ValueError("labels and class_names go together")
        for name, values in (("labels", labels), ("captions", captions)):
            if values is not None and len(values) != len(images):
                raise ValueError(f"{len(values)} {name} for {len(images)} images")
        kind = "class" if labels is not None else "text" if captions is not None else "unconditional"
        super().__init__(kind=kind, channels=images.shape[1], height=images.shape[2], width=images.shape[3],
                         source=source, class_names=class_names)
        self._images = images
        self._label_tensor = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self._caption_list = None if captions is None else list(captions)

    def __len__(self) -> int:
        return self._images.shape[0]

    def images(self, indices, flips: torch.Tensor | None = None) -> torch.Tensor:
        return self.apply_flips(self._images[self.index_list(indices)].float(), flips)

    def _labels(self, indices: list[int]) -> torch.Tensor:
        return self._label_tensor[indices]

    def _captions(self, indices: list[int]) -> list[str]:
        return [self._caption_list[i] for i in indices]
