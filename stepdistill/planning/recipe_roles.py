"""From a distillation recipe and a teacher directory's config files to :class:`RoleSpec` s.

A method declares its roles (``plan_roles``, on the method's class in its family file) with a
:class:`RolePlanner`: the frozen teacher, trained copies of the denoiser (full or LoRA, with their
EMA), the text encoders and the VAE -- held the way the distillers hold them (docs/memory.md):

- ``teacher``: the frozen denoiser (``memory.teacher_dtype``, else fp32 as loaded);
- a trained copy: fp32 master weights computed in ``training.mixed_precision``, or a LoRA on a
  frozen base (its own copy, or the teacher's weights when ``shares="teacher"``);
- ``text_encoder*``, ``vae``: frozen; in host memory with ``memory.release_encoders`` (the VAE
  stays on the GPU when real images are VAE-encoded every step).

Nothing here imports a method: recipes are read by their fields, LoRA target names are resolved by
the callable the method layer passes in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import StepdistillError
from .roles import RoleSpec

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


# -- the teacher directory's configs ------------------------------------------------------------
@dataclass
class TeacherConfigs:
    """What the planner reads from a teacher directory: ``model_index.json`` and each component's
    ``config.json`` (no weights)."""

    path: str
    family: str
    denoiser_name: str
    denoiser: dict[str, Any]  # config.json of the denoiser (with _class_name)
    components: dict[str, dict[str, Any]]  # text encoders / vae: config.json with _class_name set
    text_tokens: int | None
    discriminator: Any = None  # (module factory, example inputs) of a GAN head, made on first use

    @property
    def vae_scale_factor(self) -> int:
        vae = self.components.get("vae")
        return 2 ** (len(vae["block_out_channels"]) - 1) if vae else 1

    def default_size(self) -> int:
        """Pixels the stock pipeline makes by default: the denoiser's ``sample_size`` latents
        (FluxPipeline: 128, its transformer config has none)."""
        size = 128 if self.family == "flux" else (self.denoiser.get("sample_size") or 64)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise StepdistillError(f"stepdistill plan reads config files only, and {path} is missing")
    with open(path) as f:
        return json.load(f)


def read_teacher_configs(path: str | os.PathLike) -> TeacherConfigs:
    """``model_index.json`` and the component configs of a diffusers pipeline directory."""
    from ..teachers import detect_family, teacher_class

    path = os.fspath(path)
    family = detect_family(path)
    index = _read_json(os.path.join(path, "model_index.json"))
    name = teacher_class(family).denoiser_name
    denoiser = {"_class_name": index[name][1], **_read_json(os.path.join(path, name, "config.json"))}
    components = {}
    for component in (*TEXT_ENCODERS, "vae"):
        entry = index.get(component)
        if entry and entry[0] is not None:
            components[component] = {**_read_json(os.path.join(path, component, "config.json")), "_class_name": entry[1]}
    return TeacherConfigs(path, family, name, denoiser, components, _text_tokens(path, family))


def _text_tokens(path: str, family: str) -> int | None:
    """Prompt tokens the denoiser attends to: the CLIP tokenizer's length (+ T5's 256 for SD3,
    512 T5 tokens for Flux, as the teacher adapters encode); None for class / unconditional teachers."""
    if family not in ("sd", "sdxl", "sd3", "flux"):
        return None
    if family == "flux":
        return 512
    tokenizer = os.path.join(path, "tokenizer", "tokenizer_config.json")
    clip = int(json.load(open(tokenizer)).get("model_max_length", 77)) if os.path.isfile(tokenizer) else 77
    clip = clip if clip < 10_000 else 77  # "no limit" sentinels
    return clip + 256 if family == "sd3" else clip


# -- roles ----------------------------------------------------------------------------------------
class RolePlanner:
    """Builds the :class:`RoleSpec` s of one recipe on one teacher (see the module docstring).

    ``lora_targets(names) -> tuple``: the family's LoRA target modules for a recipe's
    ``lora_target_modules`` (empty: the family default), supplied by the method layer.
    """

    def __init__(self, recipe, configs: TeacherConfigs, lora_targets: Callable[[Sequence[str]], Sequence[str]]):
        self.recipe = recipe
        self.configs = configs
        self._lora_targets = lora_targets
        self.compute = DTYPES[recipe.training.mixed_precision]  # what autocast runs trained networks in
        # frozen denoiser weights: memory.teacher_dtype, else fp32 as loaded
        self.frozen = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.memory.teacher_dtype or "", torch.float32)

    def _frozen_weights(self) -> dict[str, Any]:
        """Frozen denoiser weights: stored in ``frozen``, computed in ``compute`` (autocast)."""
        return {"param_dtype": self.compute, "frozen_dtype": None if self.frozen == self.compute else self.frozen}

    def teacher(self, name: str = "teacher", **kwargs) -> RoleSpec:
        """The frozen teacher denoiser (``name``: another frozen copy of it, held the same way)."""
        return RoleSpec(name, config=self.configs.denoiser, **self._frozen_weights(), **kwargs)

    def trained(self, name: str, section, *, shares: str | None = None, config: dict | None = None, lora: bool = True,
                **kwargs) -> RoleSpec:
        """A trained copy of the denoiser: full (fp32 master, autocast copy) or, when ``lora`` and
        ``section.lora_rank`` > 0, a LoRA on a frozen base (``shares``: the role whose weights it
        runs on). ``config``: another denoiser config (a w-conditioned copy)."""
        config = self.configs.denoiser if config is None else config
        common = dict(gradient_checkpointing=self.recipe.memory.gradient_checkpointing, **kwargs)
        rank = section.lora_rank if lora else 0
        if rank > 0:
            return RoleSpec(name, config=config, trainable="lora", lora_rank=rank,
                            lora_targets=tuple(self._lora_targets(list(section.lora_target_modules))),
                            shares_weights_with=shares, **self._frozen_weights(), **common)
        return RoleSpec(name, config=config, trainable="full", param_dtype=self.compute, **common)

    def student(self, **kwargs) -> RoleSpec:
        """The student (``student.lora_rank``), with its EMA when the recipe keeps one."""
        kwargs.setdefault("ema", self.recipe.ema is not None)
        return self.trained("student", self.recipe.student, **kwargs)

    def encoders(self) -> list[RoleSpec]:
        """Text encoders and the VAE: frozen, as loaded (fp32); in host memory when released."""
        recipe = self.recipe
        release = recipe.memory.release_encoders
        roles = []
        for name, config in self.configs.components.items():
            on_host = release and not (name == "vae" and recipe.data.images and not recipe.data.latents)
            roles.append(RoleSpec(name, config=config, on_host=on_host))
        return roles


__all__ = ["DTYPES", "RolePlanner", "TeacherConfigs", "read_teacher_configs"]
