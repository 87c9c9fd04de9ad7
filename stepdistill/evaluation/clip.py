"""Prompt-image CLIP score through torchmetrics, with a CLIP model from a local directory.

torchmetrics' ``CLIPScore`` only accepts hub names or a callable returning ``(model, processor)``;
we pass the callable. Under transformers 5 ``get_text_features`` / ``get_image_features`` return
output objects, so the model is wrapped to hand torchmetrics the projected feature tensors.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import StepdistillError


class _FeatureTensors(nn.Module):
    """A CLIP model whose ``get_*_features`` always return tensors (transformers 4 and 5)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        return output if torch.is_tensor(output) else output.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load_local_clip(directory: str | os.PathLike) -> tuple[nn.Module, object]:
    """``(model, processor)`` from a local CLIP directory (``CLIPModel`` + ``CLIPProcessor`` files)."""
    from transformers import CLIPModel, CLIPProcessor

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise StepdistillError(f"CLIP model directory not found: {directory}")
    try:
        model = CLIPModel.from_pretrained(directory, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # transformers raises many types for incomplete directories
        raise StepdistillError(f"cannot load a CLIP model and processor from {directory}: {exc}".splitlines()[0]) from None
    return _FeatureTensors(model.eval()), processor


def _to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.repeat(1, 3, 1, 1) if pixels.shape[1] == 1 else pixels


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], clip, batch_size: int = 64) -> float:
    """Mean CLIP score (torchmetrics: 100 x cosine similarity, floored at 0) of images [N, C, H, W]
    in [-1, 1] with their prompts. ``clip``: a local directory or a ``(model, processor)`` pair."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(prompts) != images.shape[0]:
        raise StepdistillError(f"CLIP score needs one prompt per image; got {images.shape[0]} images and {len(prompts)} prompts")
    model, processor = load_local_clip(clip) if isinstance(clip, (str, os.PathLike)) else clip
    if not isinstance(model, _FeatureTensors):
        model = _FeatureTensors(model)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor), sync_on_compute=False)
    pixels = _to_rgb_uint8(images)
    for start in range(0, len(prompts), batch_size):
        metric.update(list(pixels[start : start + batch_size]), list(prompts[start : start + batch_size]))
    return float(metric.compute())
