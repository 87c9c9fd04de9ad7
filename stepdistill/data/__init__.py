"""The data layer: every image source a recipe can name behind one interface, prompt files, and
tensor shards for caches larger than memory. The lowest layer of stepdistill: it imports only
``stepdistill.errors``, ``stepdistill.config`` and third-party packages.

- ``open_images(spec, ...)`` -> :class:`ImageDataset`: a registered name, a ``datasets``
  save_to_disk directory, an image folder (flat / class sub-folders / metadata.jsonl), or what
  ``datasets.load_dataset`` reads locally (see ``sources.py``);
- ``load_prompts`` / ``prompt_list``: prompt files and inline prompts;
- ``ShardWriter`` / ``ShardedTensors`` / ``write_latent_cache``: safetensors shards.
"""

from ..errors import DataError
from .base import ImageDataset
from .folder import ImageFolderDataset
from .hf_datasets import HFImageDataset
from .in_memory import TensorImageDataset
from .latent_cache import write_latent_cache
from .prompts import PROMPT_KEYS, load_prompts, prompt_list
from .registry import register_dataset, registered_datasets
from .shards import ShardedTensors, ShardWriter
from .sources import open_images

__all__ = [
    "DataError",
    "HFImageDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "PROMPT_KEYS",
    "ShardWriter",
    "ShardedTensors",
    "TensorImageDataset",
    "load_prompts",
    "open_images",
    "prompt_list",
    "register_dataset",
    "registered_datasets",
    "write_latent_cache",
]
