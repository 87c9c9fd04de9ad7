"""Denoising diffusion training (teachers): one role, "unet", with an EMA.

For any VP schedule and any parameterization the loss is plain MSE in the network's own
parameterization:

    t ~ U{0, ..., T-1},  eps ~ N(0, I),  x_t = alpha(t) x0 + sigma(t) eps
    target = schedule.from_x0_eps(x0, eps, t, prediction_type)    # eps / x0 / v
    loss = || unet(x_t, t, label) - target ||^2

with labels replaced by the null class with probability ``label_dropout`` so the same network
also learns the unconditional prediction that classifier-free guidance needs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EMAConfig, OptimizerConfig, bounded
from ..sampling import ddim_sample
from ..schedule import NoiseSchedule, schedule_from_scheduler
from ..teachers.pixel import PixelUNetTeacher
from .trainer import Role, StepContext, Trainer, TrainingMethod


@dataclass
class DenoisingSection:
    """Recipe section ``denoising``."""

    label_dropout: float = bounded(0.1, ge=0, le=1)
    eval_inference_steps: int = bounded(50, ge=1)  # DDIM steps of the evaluation samples


class DenoisingMethod(TrainingMethod):
    """Train ``unet`` to denoise the images of ``dataset`` (a :class:`stepdistill.data.ImageDataset`;
    class-conditional when the dataset has class labels and the UNet a class embedding).

    ``scheduler``: the diffusers scheduler the trained model will sample with; its config fixes
    the noise schedule and ``prediction_type`` of the training target.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        dataset,
        optimizer: OptimizerConfig,
        ema: EMAConfig | None = EMAConfig(),
        label_dropout: float = 0.1,
        eval_inference_steps: int = 50,
    ):
        self.unet = unet
        self.scheduler = scheduler
        self.schedule: NoiseSchedule = schedule_from_scheduler(scheduler)
        if self.schedule.kind != "vp":
            raise ValueError("DenoisingMethod trains VP-schedule models (DDPM/DDIM schedulers)")
        self.prediction_type = PixelUNetTeacher(unet, scheduler).prediction_type
        self.dataset = dataset
        num_class_embeds = getattr(getattr(unet, "config", None), "num_class_embeds", None)
        self.conditional = num_class_embeds is not None
        if self.conditional and dataset.kind != "class":
            raise ValueError("the UNet has a class embedding but the dataset has no class labels")
        self.null_class = None if num_class_embeds is None else num_class_embeds - 1
        self.optimizer = optimizer
        self.ema = ema
        self.label_dropout = label_dropout
        self.eval_inference_steps = eval_inference_steps

    def roles(self) -> dict[str, Role]:
        return {"unet": Role(self.unet, optimizer=self.optimizer, ema=self.ema)}

    def training_step(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        idx = ctx.sample_indices(len(self.dataset)).tolist()
        x0 = self.dataset.images(idx).to(ctx.device)
        t = ctx.randint(0, self.schedule.num_train_timesteps)
        eps = ctx.randn(*x0.shape[1:])
        class_labels = None
        if self.conditional:
            class_labels = self.dataset.labels(idx).to(ctx.device)
            drop = ctx.rand() < self.label_dropout
            class_labels = torch.where(drop, torch.full_like(class_labels, self.null_class), class_labels)
        x_t = self.schedule.add_noise(x0, eps, t)
        target = self.schedule.from_x0_eps(x0, eps, t, self.prediction_type)
        pred = ctx.model("unet")(x_t, t, class_labels=class_labels).sample
        loss = F.mse_loss(pred.float(), target.float())
        ctx.step_role("unet", loss)
        return {"loss": loss}

    def sampling_model(self, trainer: Trainer) -> nn.Module:
        """The EMA weights when the run keeps them, else the raw ones."""
        return trainer.emas["unet"].module if "unet" in trainer.emas else trainer.unwrap("unet")

    def generate_samples(self, trainer: Trainer, num_samples: int, generator: torch.Generator):
        unet = self.sampling_model(trainer)
        teacher = PixelUNetTeacher(unet, copy.deepcopy(self.scheduler))
        shape = teacher.sample_shape()
        noise = torch.randn(num_samples, *shape, generator=generator).to(trainer.accelerator.device)
        labels = None
        if self.conditional:
            labels = torch.arange(num_samples) % teacher.num_classes
            cond = teacher.encode(labels).to(trainer.accelerator.device)
        else:
            cond = teacher.encode(None)
        images = ddim_sample(teacher, cond, noise, teacher.scheduler, self.eval_inference_steps)
        return images.clamp(-1, 1).cpu(), labels


__all__ = ["DenoisingMethod", "DenoisingSection"]
