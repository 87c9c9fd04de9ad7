"""A tiny two-role training method for the trainer tests (and the 2-process run they launch).

``critic`` updates every step, ``generator`` every second step (a two-time-scale schedule),
both draw data order and noise through the step context, and the generator keeps an EMA.

Run as a script (``accelerate launch --num_processes 2 --cpu tests/tiny_training.py OUT [faults]``)
it trains a few steps and writes the final weights to ``OUT/final_weights.safetensors``; with
``faults``, process 1 alone meets :data:`RANK_FAULTS` (a NaN loss, then SIGTERM).
"""

from __future__ import annotations

import signal
import sys

import torch
import torch.nn.functional as F
from torch import nn

from stepdistill.config import EMAConfig, OptimizerConfig, TrainingConfig
from stepdistill.training import Role, Trainer, TrainingMethod

DIM = 4


class TinyTwoRoleMethod(TrainingMethod):
    def __init__(self, ema_decay: float = 0.9, fail_at_step: int | None = None, num_data: int = 37):
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, DIM))
        self.critic = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, DIM))
        self.frozen = nn.Linear(DIM, DIM)
        self.data = torch.randn(num_data, DIM)
        self.ema_decay = ema_decay
        self.fail_at_step = fail_at_step
        self.calls: list[tuple[int, str]] = []

    def roles(self):
        opt = OptimizerConfig(lr=1e-2, warmup_steps=2, lr_scheduler="cosine")
        return {
            "generator": Role(self.generator, optimizer=opt, ema=EMAConfig(decay=self.ema_decay)),
            "critic": Role(self.critic, optimizer=OptimizerConfig(lr=3e-2, betas=(0.5, 0.9))),
            "frozen": Role(self.frozen),
        }

    def training_step(self, ctx):
        if ctx.step == self.fail_at_step:
            raise KeyboardInterrupt(f"interrupted at step {ctx.step}")
        x = self.data[ctx.sample_indices(len(self.data))].to(ctx.device)
        noise = ctx.randn(DIM)
        keep = (ctx.rand() > 0.2).float().unsqueeze(1)
        target = ctx.unwrap("frozen")(x)
        critic_loss = F.mse_loss(ctx.model("critic")(x + noise) * keep, target * keep)
        ctx.step_role("critic", critic_loss)
        self.calls.append((ctx.step, "critic"))
        logs = {"critic_loss": critic_loss}
        if ctx.step % 2 == 0:
            generator_loss = F.mse_loss(ctx.model("generator")(noise), x)
            ctx.step_role("generator", generator_loss)
            self.calls.append((ctx.step, "generator"))
            logs["generator_loss"] = generator_loss
        return logs

    def generate_samples(self, trainer, num_samples, generator):
        z = torch.randn(num_samples, DIM, generator=generator)
        images = trainer.emas["generator"].module(z).reshape(num_samples, 1, 2, 2).tanh()
        return images, torch.arange(num_samples) % 10


class Faulty(TinyTwoRoleMethod):
    """``faults``: {step: (role, "loss" | "gradient" | "SIGINT" | "SIGINT twice" | "SIGTERM")}, on
    process ``rank`` only (None: every process). A non-finite loss is NaN; a non-finite gradient
    comes with a finite loss (d sqrt(u) at u = 0)."""

    def __init__(self, faults: dict | None = None, rank: int | None = None):
        super().__init__()
        self.faults = faults or {}
        self.rank = rank

    def training_step(self, ctx):
        role, kind = self.faults.get(ctx.step, (None, None))
        if self.rank is not None and ctx.accelerator.process_index != self.rank:
            role, kind = None, None
        if kind and kind.startswith("SIG"):
            for _ in range(2 if kind.endswith("twice") else 1):
                signal.raise_signal(getattr(signal, kind.split()[0]))
        if role is None or kind not in ("loss", "gradient"):
            return super().training_step(ctx)
        original = ctx.step_role

        def poisoned(name, loss):
            if name == role:
                weight = next(ctx.model(name).parameters())
                loss = loss * float("nan") if kind == "loss" else loss + (weight * 0).sum().sqrt()
            original(name, loss)

        ctx.step_role = poisoned
        return super().training_step(ctx)


# the faults of the multi-process test: rank 1 alone sees a NaN critic loss at step 2 and SIGTERM at step 3
RANK_FAULTS = {2: ("critic", "loss"), 3: (None, "SIGTERM")}


def tiny_config(**changes) -> TrainingConfig:
    values = dict(max_steps=6, batch_size=8, seed=3, log_every=1, eval_every=0, checkpoint_every=2, keep_checkpoints=2, num_eval_samples=20)
    values.update(changes)
    return TrainingConfig(**values)


def final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for role in trainer.trainable_roles:
        for key, value in trainer.unwrap(role).state_dict().items():
            out[f"{role}.{key}"] = value.detach().cpu().clone()
    for role, ema in trainer.emas.items():
        for key, value in ema.state_dict().items():
            out[f"ema.{role}.{key}"] = value.cpu().clone()
    return out


if __name__ == "__main__":
    from safetensors.torch import save_file

    from stepdistill.errors import TrainingInterrupted

    out_dir, faults = sys.argv[1], sys.argv[2:] == ["faults"]
    trainer = Trainer(Faulty(RANK_FAULTS, rank=1) if faults else TinyTwoRoleMethod(), tiny_config(), out_dir, log_with=None, progress=False)
    try:
        trainer.train()
    except TrainingInterrupted as stop:
        sys.stdout.write(f"stopped {stop.signum} skipped {trainer.skipped_steps}\n")  # one write: two processes share stdout
        sys.stdout.flush()
    if trainer.accelerator.is_main_process:
        save_file(final_weights(trainer), f"{out_dir}/final_weights.safetensors")
        print("processes", trainer.accelerator.num_processes)
