"""Prompt encoding shared by the text-to-image teachers, and an optional text-embedding cache.

Tokenization follows the diffusers pipelines exactly (``padding="max_length"``,
``truncation=True``), so a teacher's embeddings equal the stock pipeline's for the same prompt.

:class:`TextEmbeddingCache` keeps the embeddings of each prompt (a dict of tensors, one row per
prompt) in memory and, when given a directory, on disk as one safetensors file per prompt. A
distillation run that sees the same captions every epoch then runs the text encoders once per
caption. The cache key includes a ``namespace`` (the teacher's family and text-encoder identity),
but a cache directory is still meant for one teacher: do not share it between checkpoints.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..errors import StepdistillError

EncodeFn = Callable[[list[str]], dict[str, torch.Tensor]]


def as_prompt_list(prompts: str | Sequence[str] | None, batch_size: int | None = None) -> list[str]:
    """A list of prompts from a string, a sequence, or None (the empty prompt, ``batch_size`` times)."""
    if prompts is None:
        return [""] * (batch_size or 1)
    if isinstance(prompts, str):
        prompts = [prompts] * (batch_size or 1)
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise StepdistillError(f"prompts must be strings; got {[type(p).__name__ for p in prompts]}")
    if batch_size is not None and len(prompts) != batch_size:
        raise StepdistillError(f"got {len(prompts)} prompts for a batch of {batch_size}")
    return prompts


def token_ids(tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids padded/truncated to ``max_length`` (default: the tokenizer's), as diffusers pipelines do."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _attention_mask(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor | None:
    """SD 1.x/2.x pass a mask only for text encoders whose config asks for one."""
    if getattr(text_encoder.config, "use_attention_mask", False):
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).attention_mask.to(text_encoder.device)
    return None


@torch.no_grad()
def clip_last_hidden_state(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """SD 1.x/2.x prompt embeddings: the CLIP text encoder's last hidden state."""
    ids = token_ids(tokenizer, prompts).to(text_encoder.device)
    mask = _attention_mask(text_encoder, tokenizer, prompts)
    return text_encoder(ids, attention_mask=mask)[0]


@torch.no_grad()
def clip_penultimate_and_pooled(text_encoder, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: (penultimate hidden state, first output). For a ``CLIPTextModelWithProjection`` the
    first output is the projected pooled embedding SDXL conditions on."""
    ids = token_ids(tokenizer, prompts).to(text_encoder.device)
    out = text_encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


@torch.no_grad()
def clip_pooled(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Flux: the CLIP text encoder's pooled output."""
    ids = token_ids(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids, output_hidden_states=False).pooler_output


@torch.no_grad()
def t5_last_hidden_state(text_encoder, tokenizer, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    """Flux: T5 encoder hidden states, padded to ``max_sequence_length`` tokens."""
    ids = token_ids(tokenizer, prompts, max_length=max_sequence_length).to(text_encoder.device)
    return text_encoder(ids, output_hidden_states=False)[0]


class TextEmbeddingCache:
    """Per-prompt text embeddings, in memory and optionally on disk (``directory``)."""

    def __init__(self, directory: str | os.PathLike | None = None, namespace: str = ""):
        self.directory = None if directory is None else os.fspath(directory)
        self.namespace = namespace
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)

    def key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.namespace}\0{prompt}".encode()).hexdigest()

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.safetensors")

    def get(self, prompt: str) -> dict[str, torch.Tensor] | None:
        key = self.key(prompt)
        if key in self._memory:
            return self._memory[key]
        if self.directory is not None and os.path.isfile(self._path(key)):
            self._memory[key] = load_file(self._path(key))
            return self._memory[key]
        return None

    def put(self, prompt: str, embeddings: dict[str, torch.Tensor]) -> None:
        key = self.key(prompt)
        row = {name: value.detach().to("cpu").contiguous() for name, value in embeddings.items()}
        self._memory[key] = row
        if self.directory is not None:
            save_file(row, self._path(key))

    def __len__(self) -> int:
        return len(self._memory)

    def encode(self, prompts: list[str], encode_fn: EncodeFn, device=None) -> dict[str, torch.Tensor]:
        """Embeddings for ``prompts``: cached rows, plus one batched ``encode_fn`` call for the misses."""
        missing = list(dict.fromkeys(p for p in prompts if self.get(p) is None))
        if missing:
            fresh = encode_fn(missing)
            for i, prompt in enumerate(missing):
                self.put(prompt, {name: value[i] for name, value in fresh.items()})
        rows = [self.get(p) for p in prompts]
        return {name: torch.stack([row[name] for row in rows]).to(device) for name in rows[0]}


def encode_with_cache(prompts: list[str], encode_fn: EncodeFn, cache: TextEmbeddingCache | None, device=None):
    """``encode_fn(prompts)`` directly, or through ``cache`` when there is one."""
    if cache is None:
        return encode_fn(prompts)
    return cache.encode(prompts, encode_fn, device=device)


__all__ = [
    "TextEmbeddingCache",
    "as_prompt_list",
    "clip_last_hidden_state",
    "clip_penultimate_and_pooled",
    "clip_pooled",
    "encode_with_cache",
    "t5_last_hidden_state",
    "token_ids",
]
