"""DiT teachers (``DiTPipeline`` checkpoints: facebook/DiT-XL-2-256 / -512 and fine-tunes).

DiT is a class-conditional latent transformer on a VP schedule. What ``DiTPipeline.__call__``
(diffusers 0.42) does, and what this adapter reproduces:

- **Classes.** ``num_embeds_ada_norm`` classes (1000 for ImageNet); the label-embedding table has
  one more row, the *null class* at index ``num_embeds_ada_norm``, which is the CFG "uncond"
  branch. The pipeline hard-codes that index as 1000; here it is read from the config, which is
  the same for every ImageNet DiT (a DiT with another class count does not run in the stock
  pipeline at all).
- **Learned sigma.** With ``out_channels == 2 x in_channels`` the network outputs (eps, variance
  interpolation); the pipeline keeps only the first ``in_channels`` channels as the epsilon
  prediction and the scheduler never sees the variance half. :meth:`DiTTeacher.model_output`
  returns that eps half, so ``prediction_type`` is the scheduler's ("epsilon").
- **Guidance.** ``uncond + guidance_scale * (cond - uncond)`` -- the project's convention, same
  ``w`` -- applied to the eps channels only (all ``in_channels`` of them). The original DiT code
  (``forward_with_cfg``) guides only the first 3 of the 4 latent channels "for exact
  reproducibility"; older diffusers releases copied that (``noise_pred[:, :3]``); diffusers 0.42
  guides all eps channels, and so does this adapter. The variance half, which the pipeline
  carries along unguided, is dropped by both before the scheduler step.
- **Guidance on/off.** The pipeline runs the null branch only when ``guidance_scale > 1``; at
  ``w = 1`` both give the conditional prediction. For ``w < 1`` the pipeline silently ignores
  guidance, while ``predict`` here interpolates towards the null class (the project's CFG).
- **No label dropout.** DiT's label embedding replaces labels by the null class with
  probability 0.1 whenever the network is in train mode, drawing from the global RNG (it is
  how DiT learned CFG). Distillation passes the null class itself for CFG, and a student or
  fake score in train mode must see the labels it is given, so the adapter sets that
  probability to 0 on its transformer -- and with it on every copy a distiller makes of it.
  Inference (eval mode) never drops labels, so the stock pipeline is unaffected.
- Latents: ``transformer.config.sample_size`` square (32 for 256 px), ``in_channels`` (4)
  channels, decoded as ``vae.decode(latents / scaling_factor)`` (no shift).

``encode`` takes class ids (ints in ``[0, num_classes)``) or, when the checkpoint carries
``id2label`` (ImageNet names in DiT-XL-2's ``model_index.json``), label strings such as "white
shark", looked up as ``DiTPipeline.get_label_ids`` does.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..errors import TeacherLoadError
from .base import Conditioning
from .latent import LatentTeacher


class DiTTeacher(LatentTeacher):
    family = "dit"
    denoiser_name = "transformer"
    pipeline_class_name = "DiTPipeline"
    component_names = ("transformer", "vae", "scheduler")

    def __init__(self, transformer, vae, scheduler, id2label: Mapping[Any, str] | None = None):
        super().__init__(vae, scheduler)
        if getattr(transformer.config, "num_embeds_ada_norm", None) is None:
            raise TeacherLoadError(f"{type(transformer).__name__} is not class-conditional (no num_embeds_ada_norm): not a DiT")
        self.transformer = transformer
        self.id2label = None if not id2label else {int(k): str(v) for k, v in id2label.items()}
        disable_label_dropout(transformer)
        self._freeze()

    @classmethod
    def _pipeline_options(cls, options):
        """``id2label`` from model_index.json (DiT-XL-2 ships the ImageNet names there)."""
        return {"id2label": options["id2label"]} if options.get("id2label") else {}

    @classmethod
    def from_pipeline(cls, pipe, **kwargs):
        """Wrap a ``DiTPipeline`` object's components; its ``labels`` (name -> id) become ``id2label``."""
        if "id2label" not in kwargs:
            grouped: dict[int, list[str]] = {}
            for name, index in (getattr(pipe, "labels", None) or {}).items():
                grouped.setdefault(int(index), []).append(name)
            kwargs["id2label"] = {k: ", ".join(v) for k, v in grouped.items()}
        missing = [name for name in cls.component_names if getattr(pipe, name, None) is None]
        if missing:
            raise TeacherLoadError(f"{type(pipe).__name__} lacks components {missing} that {cls.__name__} needs")
        return cls(**{name: getattr(pipe, name) for name in cls.component_names}, **kwargs)

    def build_pipeline(self, denoiser, scheduler):
        """A ``DiTPipeline`` around ``denoiser``; ``id2label`` (if any) goes into its config, so
        ``save_pretrained`` writes it to model_index.json and ``from_pretrained`` reads it back."""
        from diffusers import DiTPipeline

        pipe = DiTPipeline(transformer=denoiser, vae=self.vae, scheduler=scheduler, id2label=self.id2label)
        if self.id2label:
            pipe.register_to_config(id2label={str(k): v for k, v in self.id2label.items()})
        return pipe

    # -- conditions ---------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def null_class(self) -> int:
        """The label-embedding row DiT was trained to use for dropped labels (its CFG null branch)."""
        return self.num_classes

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> class id, split on commas as ``DiTPipeline.labels`` (empty without id2label)."""
        out = {}
        for index, names in (self.id2label or {}).items():
            for name in names.split(","):
                out[name.strip()] = index
        return dict(sorted(out.items()))

    def encode(self, conditions: Sequence[int | str] | torch.Tensor | None, batch_size: int | None = None) -> Conditioning:
        """Class ids (or label names) -> Conditioning; the uncond branch is the null class."""
        if conditions is None:
            raise ValueError(f"DiT is class-conditional ({self.num_classes} classes): pass class labels")
        if not isinstance(conditions, torch.Tensor) and any(isinstance(c, str) for c in conditions):
            unknown = [c for c in conditions if isinstance(c, str) and c not in self.labels]
            if unknown:
                known = "no id2label in this checkpoint" if not self.labels else "see teacher.labels"
                raise ValueError(f"unknown class label names {unknown} ({known})")
            conditions = [self.labels[c] if isinstance(c, str) else c for c in conditions]
        labels = torch.as_tensor(conditions, dtype=torch.long).reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}); got {labels.tolist()}")
        if batch_size is not None and labels.numel() != batch_size:
            raise ValueError(f"got {labels.numel()} class labels for a batch of {batch_size}")
        labels = labels.to(self.device)
        return Conditioning(cond={"class_labels": labels}, uncond={"class_labels": torch.full_like(labels, self.null_class)})

    # -- network ------------------------------------------------------------------------------
    @property
    def learns_sigma(self) -> bool:
        """True when the network also outputs a variance half (DiTPipeline's own test)."""
        return self.transformer.out_channels // 2 == self.transformer.config.in_channels

    def model_output(self, x_t, t, cond, extra):
        """The epsilon prediction (the first ``in_channels`` output channels when sigma is learned)."""
        out = self.transformer(x_t.to(self.transformer.dtype), timestep=t, class_labels=cond["class_labels"]).sample
        return out[:, : self.transformer.config.in_channels] if self.learns_sigma else out

    def sample_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """Latent (C, H, W) for ``height`` x ``width`` pixels (default: DiTPipeline's only size,
        ``sample_size`` latents square)."""
        height, width = self._default_size(height, width, self.transformer.config.sample_size)
        return (self.transformer.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)


def disable_label_dropout(network: torch.nn.Module) -> None:
    """Label embeddings of ``network`` never drop labels, in train mode too (see the module docstring)."""
    from diffusers.models.embeddings import LabelEmbedding

    for module in network.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


__all__ = ["DiTTeacher", "disable_label_dropout"]
