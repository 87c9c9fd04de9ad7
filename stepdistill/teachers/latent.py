"""What the latent teachers (SD 1.x/2.x, SDXL, SD3, Flux; DiT for loading and the VAE) have in common.

- loading the components of a diffusers pipeline directory, each from its subfolder, with the
  classes its ``model_index.json`` names (:func:`load_components`);
- the VAE: images in [-1, 1] <-> latents scaled (and shifted) as the stock pipeline does;
- ``encode(prompts)``: cond embeddings (optionally cached per prompt), the empty-prompt
  embeddings as the CFG "uncond" branch, and per-batch extras.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Sequence

import torch

from ..errors import TeacherLoadError
from ..schedule import prediction_type_of, schedule_from_scheduler
from .base import Conditioning, Teacher
from .text import TextEmbeddingCache, as_prompt_list, encode_with_cache

# Components a teacher never needs; loading them would only cost memory.
_SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def read_model_index(path: str) -> dict[str, Any]:
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise TeacherLoadError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    with open(index_path) as f:
        return json.load(f)


def load_components(
    path: str | os.PathLike, names: Sequence[str], torch_dtype: torch.dtype | None = None, optional: Sequence[str] = ()
) -> dict[str, Any]:
    """Load ``names`` from the subfolders of a diffusers pipeline directory, with the classes
    its model_index.json lists (as ``DiffusionPipeline.from_pretrained`` would). A name in
    ``optional`` that model_index.json lists as absent (``[null, null]``) or not at all is None."""
    path = os.fspath(path)
    index = read_model_index(path)
    components = {}
    for name in names:
        entry = index.get(name)
        if (not entry or entry[0] is None) and name in optional:
            components[name] = None
            continue
        if not entry or entry[0] is None:
            raise TeacherLoadError(f"{path}/model_index.json has no {name!r} component")
        if not os.path.isdir(os.path.join(path, name)):
            raise TeacherLoadError(f"{path} lacks the {name!r} subfolder that model_index.json lists")
        library, class_name = entry
        try:
            cls = getattr(importlib.import_module(library), class_name)
        except (ImportError, AttributeError):
            raise TeacherLoadError(f"{name!r} in {path}: cannot import {library}.{class_name}") from None
        kwargs = {"subfolder": name}
        if torch_dtype is not None and hasattr(cls, "parameters"):  # models, not tokenizers / schedulers
            kwargs["torch_dtype"] = torch_dtype
        try:
            component = cls.from_pretrained(path, **kwargs)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise TeacherLoadError(f"cannot load {name!r} ({class_name}) from {path}: {exc}") from None
        if isinstance(component, torch.nn.Module):
            component.eval()
        components[name] = component
    return components


def pipeline_config(pipe) -> dict[str, Any]:
    """The pipeline-level options of a pipeline object (``force_zeros_for_empty_prompt``, ...)."""
    return {k: v for k, v in dict(pipe.config).items() if not k.startswith("_") and not isinstance(v, (list, tuple))}


class LatentTeacher(Teacher):
    """A latent text-to-image teacher: a denoiser, a VAE, text encoders and a scheduler.

    Subclasses implement ``_encode_text(prompts) -> dict`` (batched embeddings, the keys of
    ``Conditioning.cond``), :meth:`model_output` and :meth:`sample_shape`.
    """

    is_latent = True
    pipeline_class_name: str = ""
    component_names: tuple[str, ...] = ()
    optional_component_names: tuple[str, ...] = ()  # may be None (SD3 without its T5 encoder)

    def __init__(self, vae, scheduler, text_cache: TextEmbeddingCache | None = None):
        super().__init__()
        self.vae = vae
        self.scheduler = scheduler
        self.schedule = schedule_from_scheduler(scheduler)
        self.prediction_type = prediction_type_of(scheduler)
        self.text_cache = text_cache
        self._null_embeddings: dict[str, torch.Tensor] | None = None
        # diffusers upcasts fp16 VAEs that overflow (force_upcast) to float32 before decoding.
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)

    def _freeze(self) -> None:
        """Teachers are frozen; subclasses call this once all their modules are registered."""
        self.requires_grad_(False)
        self.eval()

    def build_pipeline(self, denoiser: torch.nn.Module, scheduler):
        """The family's stock diffusers pipeline around ``denoiser`` and ``scheduler``, sharing
        this teacher's text encoders, tokenizers and VAE (``pipeline_class_name`` with the
        components of ``component_names``)."""
        import diffusers

        parts = {name: getattr(self, name) for name in self.component_names}
        parts[self.denoiser_name] = denoiser
        parts["scheduler"] = scheduler
        return getattr(diffusers, self.pipeline_class_name)(**parts, **self._pipeline_kwargs())

    def _pipeline_kwargs(self) -> dict[str, Any]:
        """Constructor options of the stock pipeline besides its components."""
        return {}

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None, **kwargs):
        """Load from a diffusers pipeline directory (``model_index.json`` + component subfolders)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise TeacherLoadError(f"teacher path is not a directory: {path}")
        components = load_components(path, cls.component_names, torch_dtype=torch_dtype, optional=cls.optional_component_names)
        options = {k: v for k, v in read_model_index(path).items() if not k.startswith("_") and not isinstance(v, list)}
        return cls(**components, **cls._pipeline_options(options), **kwargs)

    @classmethod
    def from_pipeline(cls, pipe, **kwargs):
        """Wrap the components of a diffusers pipeline object you already hold (shared, not copied)."""
        required = [name for name in cls.component_names if name not in cls.optional_component_names]
        missing = [name for name in required if getattr(pipe, name, None) is None]
        if missing:
            raise TeacherLoadError(f"{type(pipe).__name__} lacks components {missing} that {cls.__name__} needs")
        components = {name: getattr(pipe, name, None) for name in cls.component_names}
        return cls(**components, **cls._pipeline_options(pipeline_config(pipe)), **kwargs)

    @classmethod
    def _pipeline_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Pipeline-level options (from model_index.json) the adapter takes as constructor arguments."""
        return {}

    # -- conditions ---------------------------------------------------------------------------
    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _embed(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeddings = encode_with_cache(prompts, self._encode_text, self.text_cache)
        return {k: v.to(self.device) for k, v in embeddings.items()}

    def null_embeddings(self) -> dict[str, torch.Tensor]:
        """Embeddings of the empty prompt (batch of one), computed once."""
        if self._null_embeddings is None:
            self._null_embeddings = self._embed([""])
        return self._null_embeddings

    def _uncond_like(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The CFG null branch for ``cond``: the empty prompt's embeddings, repeated over the batch."""
        batch = next(iter(cond.values())).shape[0]
        return {k: v.repeat(batch, *([1] * (v.ndim - 1))) for k, v in self.null_embeddings().items()}

    def _extra(self, cond: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {}

    def encode(self, prompts: str | Sequence[str] | None, batch_size: int | None = None) -> Conditioning:
        """Prompts -> Conditioning (cond: the prompts; uncond: the empty prompt, as the stock
        pipelines use when no negative prompt is given). ``None`` means unconditional ("")."""
        cond = self._embed(as_prompt_list(prompts, batch_size))
        return Conditioning(cond=cond, uncond=self._uncond_like(cond), extra=self._extra(cond))

    # -- VAE ----------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _latent_stats(self, latents: torch.Tensor):
        """(mean, std) of SDXL-style ``latents_mean/std`` VAE configs, else None."""
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return None
        shape = (1, len(mean), *([1] * (latents.ndim - 2)))
        return (
            torch.tensor(mean).view(shape).to(latents.device, latents.dtype),
            torch.tensor(std).view(shape).to(latents.device, latents.dtype),
        )

    @torch.no_grad()
    def vae_encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = False) -> torch.Tensor:
        """Images in [-1, 1] -> latents the denoiser works on (scaled and shifted).

        Uses the posterior mean unless ``sample_posterior`` (then draws with ``generator``).
        """
        dist = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample_posterior else dist.mode()
        cfg = self.vae.config
        stats = self._latent_stats(z)
        if stats is not None:
            return (z - stats[0]) * cfg.scaling_factor / stats[1]
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (z - shift) * cfg.scaling_factor

    @torch.no_grad()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (unclamped, like ``vae.decode``), as the stock pipeline decodes."""
        cfg = self.vae.config
        latents = latents.to(self.vae.device, self.vae.dtype)
        stats = self._latent_stats(latents)
        if stats is not None:
            z = latents * stats[1] / cfg.scaling_factor + stats[0]
        else:
            z = latents / cfg.scaling_factor
            shift = getattr(cfg, "shift_factor", None)
            if shift is not None:
                z = z + shift
        return self.vae.decode(z, return_dict=False)[0]

    def _default_size(self, height: int | None, width: int | None, default_latent_size) -> tuple[int, int]:
        size = default_latent_size if isinstance(default_latent_size, (tuple, list)) else (default_latent_size,) * 2
        return (height or size[0] * self.vae_scale_factor, width or size[1] * self.vae_scale_factor)





def load_single_file_pipeline(
    pipeline_class,
    path: str | os.PathLike,
    config: str | os.PathLike | None = None,
    original_config: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    **kwargs,
):
    """``pipeline_class.from_single_file`` with offline-friendly checks and one-line errors.

    Offline, diffusers needs the component configs from somewhere: ``config`` (a local diffusers
    pipeline directory of the same architecture, e.g. a saved stable-diffusion-v1-5) or
    ``original_config`` (the original LDM ``.yaml``). Pickle checkpoints (.ckpt/.pt/.bin) are
    refused unless ``allow_pickle=True``.
    """
    path = os.fspath(path)
    name = pipeline_class.__name__
    if not os.path.isfile(path):
        raise TeacherLoadError(f"single-file checkpoint not found: {path}")
    if not path.endswith(".safetensors") and not allow_pickle:
        raise TeacherLoadError(
            f"{path} is not a .safetensors file; pickle checkpoints can run code: convert it, or pass allow_pickle=True"
        )
    if config is not None:
        config = os.fspath(config)
        if not os.path.isfile(os.path.join(config, "model_index.json")):
            raise TeacherLoadError(f"config={config} is not a local diffusers pipeline directory (no model_index.json)")
    if original_config is not None:
        original_config = os.fspath(original_config)
        if not os.path.isfile(original_config):
            raise TeacherLoadError(f"original_config={original_config} is not a file")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if config is None and original_config is None and offline:
        raise TeacherLoadError(
            f"loading {path} offline needs the component configs: pass config=<local diffusers directory of the same "
            "architecture> or original_config=<the original LDM .yaml>"
        )
    try:
        return pipeline_class.from_single_file(
            path, config=config, original_config=original_config, torch_dtype=torch_dtype, local_files_only=offline, **kwargs
        )
    except Exception as exc:  # diffusers raises many kinds here; the user needs one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if config is not None else " (passing config=<local diffusers directory of the same architecture> usually fixes this)"
        raise TeacherLoadError(f"{name}.from_single_file({path}) failed: {first_line}{hint}") from exc

__all__ = ["LatentTeacher", "load_components", "load_single_file_pipeline", "read_model_index"]
