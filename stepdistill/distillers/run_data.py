"""What a distillation run reads, from the recipe's ``data:`` section, in the teacher's terms.

- :class:`ConditionPool`: the conditions the student is trained on -- every class of a
  class-conditional teacher, the prompts of a text-to-image teacher (``data.prompts`` /
  ``data.prompts_file``, else the captions of ``data.images`` / the latent cache), or the one
  empty condition of an unconditional teacher -- encoded once.
- :class:`RealSamples`: real samples in the network's space (pixels, or VAE latents encoded
  on the fly or read from a latent cache) with their conditions: the GAN's real data, the
  consistency family's training data. Rows are read on demand, so a dataset or cache larger
  than memory works.

Everything is indexed by the trainer's deterministic (seed, step) indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import RecipeError
from ..teachers.base import Conditioning
from .recipe import DataSection, DistillRecipe

TEXT_FAMILIES = ("sd", "sdxl", "flux", "sd3")


def condition_kind(teacher) -> str:
    """"text", "class" or "unconditional": what the teacher's ``encode`` takes."""
    if teacher.family in TEXT_FAMILIES:
        return "text"
    return "class" if getattr(teacher, "num_classes", None) else "unconditional"


class ConditionPool:
    """Every condition the run trains on, encoded once; batches are index tensors into it."""

    def __init__(self, teacher, conditions: Sequence[Any] | None):
        self.kind = condition_kind(teacher)
        self.conditions = None if conditions is None else list(conditions)
        self.encoded = teacher.encode(self.conditions) if self.conditions is not None else teacher.encode(None)

    def __len__(self) -> int:
        return 1 if self.conditions is None else len(self.conditions)

    def index(self, idx: torch.Tensor) -> Conditioning:
        if self.conditions is None:
            return self.encoded  # unconditional: nothing to select
        return self.encoded.index(idx.cpu()).to(idx.device)

    def raw(self, idx: torch.Tensor):
        """The un-encoded conditions at ``idx`` (labels tensor, prompts list or None)."""
        if self.conditions is None:
            return None
        picked = [self.conditions[int(i)] for i in idx.reshape(-1).tolist()]
        return torch.tensor(picked, dtype=torch.long) if self.kind == "class" else picked


def _prompts_of(section: DataSection) -> list[str]:
    if not section.prompts and not section.prompts_file:
        return []
    from ..data import prompt_list

    return prompt_list(list(section.prompts), section.prompts_file)


def condition_pool(teacher, recipe: DistillRecipe, real: "RealSamples | None" = None) -> ConditionPool:
    """Class labels 0..n-1, the recipe's prompts (or the real data's captions), or unconditional."""
    kind = condition_kind(teacher)
    if kind == "class":
        return ConditionPool(teacher, list(range(teacher.num_classes)))
    if kind == "unconditional":
        return ConditionPool(teacher, None)
    prompts = _prompts_of(recipe.data)
    if not prompts and real is not None and real.captions is not None:
        prompts = sorted(set(real.captions))
    if not prompts:
        raise RecipeError("data: a text-to-image teacher needs prompts (data.prompts, data.prompts_file, or captioned data.images)")
    return ConditionPool(teacher, prompts)


@dataclass
class RealSamples:
    """Real samples in the network's space, with their conditions (see the module docstring)."""

    teacher: Any
    dataset: Any = None  # stepdistill.data.ImageDataset
    latents: Any = None  # stepdistill.data.ShardedTensors with "latents"
    captions: list[str] | None = None  # latent cache: the captions "caption_index" points into
    random_flip: bool = False
    source: str = ""

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.latents)

    def conditions(self, idx: torch.Tensor):
        """Labels / captions / None of rows ``idx``, as the teacher's ``encode`` takes them."""
        kind = condition_kind(self.teacher)
        if kind == "unconditional":
            return None
        if self.dataset is not None:
            return self.dataset.conditions(idx.tolist())
        key = "labels" if kind == "class" else "caption_index"
        if key not in self.latents.keys:
            raise RecipeError(f"data.latents {self.source} has no '{key}' for this {kind}-conditioned teacher")
        values = self.latents.get(key, idx.tolist()).long()
        return values if kind == "class" else [self.captions[int(i)] for i in values.tolist()]

    @torch.no_grad()
    def batch(self, idx: torch.Tensor, device, flips: torch.Tensor | None = None) -> tuple[torch.Tensor, Conditioning]:
        """(x0 [B, ...] float32 on ``device``, encoded conditions) of rows ``idx``."""
        idx = idx.cpu()
        if self.dataset is not None:
            images = self.dataset.images(idx.tolist(), flips=flips.cpu() if (flips is not None and self.random_flip) else None)
            x0 = self.teacher.vae_encode(images.to(device)).float() if self.teacher.is_latent else images
        else:
            x0 = self.latents.get("latents", idx.tolist()).float()
        conditions = self.conditions(idx)
        cond = self.teacher.encode(conditions) if conditions is not None else self.teacher.encode(None, batch_size=len(idx))
        return x0.to(device), cond.to(device)


def image_size(teacher, recipe: DistillRecipe) -> tuple[int, int]:
    """The pixel size real images are resized to: data.resolution, else the teacher's."""
    if recipe.data.resolution:
        return recipe.data.resolution, recipe.data.resolution
    shape = teacher.sample_shape(recipe.teacher.height, recipe.teacher.width)
    if not teacher.is_latent:
        return int(shape[-2]), int(shape[-1])
    factor = teacher.vae_scale_factor
    return int(shape[-2]) * factor, int(shape[-1]) * factor


def image_channels(teacher) -> int:
    if teacher.is_latent:
        return int(teacher.vae.config.in_channels)
    return int(teacher.sample_shape()[0])


def real_samples(teacher, recipe: DistillRecipe) -> RealSamples | None:
    """The recipe's real data (``data.latents`` first, else ``data.images``), checked against the teacher."""
    d = recipe.data
    kind = condition_kind(teacher)
    if d.latents:
        if not teacher.is_latent:
            raise RecipeError("data.latents is for latent teachers (SD / SDXL / Flux ...); pixel teachers read data.images")
        from ..data import ShardedTensors

        cache = ShardedTensors(d.latents)
        captions = cache.metadata.get("captions")
        if "prompt_index" in cache.keys and "caption_index" not in cache.keys:
            captions = _prompts_of(d)  # the round-1 format: prompt_index into data.prompts
            cache = _RenamedKeys(cache, {"caption_index": "prompt_index"})
        channels = teacher.sample_shape()[0]
        if cache.shape("latents")[1] != channels:
            raise RecipeError(f"data.latents {d.latents} hold {cache.shape('latents')[1]}-channel latents; this teacher's have {channels}")
        return RealSamples(teacher, latents=cache, captions=captions, source=d.latents)
    if not d.images:
        return None
    from ..data import open_images

    dataset = open_images(
        d.images, channels=image_channels(teacher), resolution=image_size(teacher, recipe), center_crop=d.center_crop,
        image_column=d.image_column, caption_column=d.caption_column, label_column=d.label_column, split=d.split,
    )
    if kind == "class" and dataset.kind != "class":
        raise RecipeError(f"the teacher is class-conditional ({teacher.num_classes} classes) but data.images {d.images} has no class labels ({dataset.kind})")
    if kind == "class" and dataset.num_classes > teacher.num_classes:
        raise RecipeError(f"data.images {d.images} has {dataset.num_classes} classes; the teacher knows {teacher.num_classes}")
    if kind == "text" and dataset.kind != "text":
        raise RecipeError(f"the teacher is text-to-image but data.images {d.images} has no captions ({dataset.kind}): add a metadata.jsonl with text")
    captions = dataset.captions(list(range(len(dataset)))) if dataset.kind == "text" else None
    return RealSamples(teacher, dataset=dataset, captions=captions, random_flip=d.random_flip, source=d.images)


class TensorRows:
    """In-memory rows with the reading interface of :class:`stepdistill.data.ShardedTensors`
    (``keys``, ``metadata``, ``shape``, ``get``): latents a caller already holds."""

    def __init__(self, metadata: dict | None = None, **tensors: torch.Tensor):
        self.tensors = tensors
        self.keys = list(tensors)
        self.metadata = dict(metadata or {})

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def shape(self, key: str):
        return tuple(self.tensors[key].shape)

    def get(self, key: str, indices):
        return self.tensors[key][torch.as_tensor(list(indices), dtype=torch.long)]


def in_memory_samples(teacher, x0: torch.Tensor, conditions=None) -> RealSamples:
    """Real samples from tensors in the network's space (pixels, or latents for latent teachers)
    with their conditions (class labels, captions, or None)."""
    from ..data import TensorImageDataset

    kind = condition_kind(teacher)
    if teacher.is_latent:
        captions = list(conditions) if kind == "text" else None
        rows = {"latents": x0}
        if kind == "class":
            rows["labels"] = torch.as_tensor(conditions, dtype=torch.long)
        elif kind == "text":
            unique = sorted(set(captions))
            rows["caption_index"] = torch.tensor([unique.index(c) for c in captions])
            captions = unique
        return RealSamples(teacher, latents=TensorRows(**rows), captions=captions, source="in-memory latents")
    if kind == "class":
        labels = torch.as_tensor(conditions, dtype=torch.long)
        dataset = TensorImageDataset(x0, labels=labels, class_names=[str(i) for i in range(teacher.num_classes)])
    elif kind == "text":
        dataset = TensorImageDataset(x0, captions=list(conditions))
    else:
        dataset = TensorImageDataset(x0)
    captions = dataset.captions(list(range(len(dataset)))) if dataset.kind == "text" else None
    return RealSamples(teacher, dataset=dataset, captions=captions, source="in-memory images")


class _RenamedKeys:
    """A ShardedTensors view with renamed keys (reads round-1 latent files)."""

    def __init__(self, cache, renames: dict[str, str]):
        self.cache, self.renames = cache, renames
        self.keys = [k for k in cache.keys] + list(renames)
        self.metadata = cache.metadata

    def __len__(self) -> int:
        return len(self.cache)

    def shape(self, key: str):
        return self.cache.shape(self.renames.get(key, key))

    def get(self, key: str, indices):
        return self.cache.get(self.renames.get(key, key), indices)


__all__ = ["ConditionPool", "RealSamples", "TensorRows", "in_memory_samples", "condition_kind", "condition_pool", "image_channels", "image_size", "real_samples"]
