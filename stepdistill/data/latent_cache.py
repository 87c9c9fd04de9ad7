"""A dataset encoded once (VAE latents, optionally condition embeddings) as tensor shards.

Keys written: ``latents`` [N, ...] from ``encode_images``, in the dtype it returns; by the
dataset's kind ``labels`` (int64) or ``caption_index`` (int64, into ``metadata["captions"]``,
identical captions stored once); and whatever ``encode_conditions(conditions)`` returns (a dict
of [B, ...] tensors, one row per image, e.g. ``{"prompt_embeds": ...}``). ``metadata`` also
records the source, kind, image shape and class names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .base import ImageDataset
from .shards import ShardWriter


@torch.no_grad()
def write_latent_cache(encode_images: Callable[[torch.Tensor], torch.Tensor], dataset: ImageDataset,
                       directory: str | os.PathLike, batch_size: int = 16, shard_rows: int = 4096, progress: bool = True,
                       encode_conditions: Callable[[object], dict[str, torch.Tensor]] | None = None) -> Path:
    """Encode every image of ``dataset`` in index order (``encode_images``: images in [-1, 1] ->
    latents, e.g. ``teacher.vae_encode``) into a new shard directory; returns its path."""
    metadata = {"source": dataset.source, "kind": dataset.kind,
                "image_shape": [dataset.channels, dataset.height, dataset.width]}
    if dataset.kind == "class":
        metadata["class_names"] = dataset.class_names
    caption_index: dict[str, int] = {}
    with (
        ShardWriter(directory, shard_rows=shard_rows, metadata=metadata) as writer,
        tqdm(total=len(dataset), disable=not progress, desc="encoding latents", unit="img") as bar,
    ):
        for start in range(0, len(dataset), batch_size):
            indices = list(range(start, min(start + batch_size, len(dataset))))
            rows = {"latents": encode_images(dataset.images(indices)).cpu()}
            if dataset.kind == "class":
                rows["labels"] = dataset.labels(indices)
            elif dataset.kind == "text":
                captions = dataset.captions(indices)
                rows["caption_index"] = torch.tensor([caption_index.setdefault(c, len(caption_index)) for c in captions])
            if encode_conditions is not None:
                rows.update(encode_conditions(dataset.conditions(indices)))
            writer.add(**rows)
            bar.update(len(indices))
        if dataset.kind == "text":
            writer.metadata["captions"] = list(caption_index)
    return writer.directory
