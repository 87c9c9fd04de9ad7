"""The shared trainer: one loop for teacher training and every distiller.

A *method* (teacher denoising, DMD2, LCM, ...) owns named *roles* -- ``nn.Module`` s such as
"student", "fake_score", "discriminator", or frozen ones like "teacher" -- and says which get an
optimizer and an EMA (:class:`Role`). Its :meth:`TrainingMethod.training_step` computes losses
and decides which role steps on which iteration through :class:`StepContext`::

    def training_step(self, ctx):
        x0 = self.images[ctx.sample_indices(len(self.images))].to(ctx.device)
        noise = ctx.randn(*x0.shape[1:])
        ...
        fake_loss = ...
        ctx.step_role("fake_score", fake_loss)          # every step
        if ctx.step % 5 == 0:                            # two-time-scale update
            ctx.step_role("student", generator_loss)
        return {"fake_loss": fake_loss, ...}

The trainer owns everything else: the ``accelerate.Accelerator`` (mixed precision, distributed
data parallel), per-role AdamW optimizers and LR schedules, gradient accumulation and clipping,
EMA, tensorboard logging, periodic evaluation with a sample grid, atomic full-state
checkpoints, resume, and the output-directory guard.

Determinism. All randomness a method draws through the context -- data order, noise,
timesteps, label dropout -- comes from a generator seeded with (seed, step, micro-step) that
draws the GLOBAL micro-batch; each process keeps its slice. Role construction draws from the
global RNGs, seeded once before it (:func:`seed_run`); no training step draws from them. So two
runs of a recipe end with bitwise-identical weights on CPU, a resumed run ends with the same
weights as an uninterrupted one, and N processes end with the same weights as one process at
the same global batch (up to floating-point summation order).

Faults.

- Non-finite losses and gradients: at each role's update the trainer checks its loss (every
  micro-step) and its averaged gradients (all processes agree). From the first non-finite one
  on, the step updates nothing more: that role and every role after it in the step keep their
  weights, optimizer state, LR schedule and EMA. Roles that already updated earlier in the same
  step (DMD2's generator before its critic) keep their finite update: undoing it would need a
  copy of their weights and optimizer state at every step. The step is counted
  (``skipped_steps``, in checkpoints); past ``training.max_skipped_steps`` the run stops with
  :class:`~stepdistill.errors.TrainingDiverged`, its latest checkpoint the last good state.
  Under fp16 the GradScaler keeps handling gradient overflow itself (it skips and lowers the
  scale); only non-finite losses are counted there.
- SIGTERM / SIGINT (Ctrl-C): the step in progress finishes, a checkpoint is written at its
  boundary and :meth:`Trainer.train` raises :class:`~stepdistill.errors.TrainingInterrupted`
  (the CLI exits with 128 + the signal number); ``--resume`` continues bitwise-identically. A
  second Ctrl-C interrupts at once (no checkpoint).
- A kill (SIGKILL, power loss): checkpoints are atomic, resume takes the latest complete one.
- Checkpoints are written before evaluations, so a crash in an evaluation loses no training;
  a resumed run evaluates again at its restart step when an evaluation was due there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..config import EMAConfig, OptimizerConfig, TrainingConfig
from ..errors import OutputDirError, RecipeError, TrainingDiverged, TrainingInterrupted
from ..images import save_image_grid
from .checkpoint import RUN_FILE, checkpoint_name, latest_checkpoint, load_checkpoint, remove_partial_checkpoints, save_checkpoint
from .ema import EMA

CURVE_FILE = "curve.jsonl"  # one row per evaluation: step, minutes since the run (re)started, metrics

# images [N, C, H, W] in [-1, 1], labels [N] or None -> named metrics
Evaluator = Callable[[torch.Tensor, "torch.Tensor | None"], Mapping[str, float]]


@dataclass
class Role:
    """A module a method owns. ``optimizer=None``: frozen (moved to the device, no gradients)."""

    module: nn.Module
    optimizer: OptimizerConfig | None = None
    ema: EMAConfig | None = None


class TrainingMethod:
    """Base class of training methods (teacher denoising, distillers)."""

    def roles(self) -> dict[str, Role]:
        raise NotImplementedError

    def training_step(self, ctx: "StepContext") -> dict[str, Any]:
        """One micro-step: compute losses, call ``ctx.step_role`` for the roles that update."""
        raise NotImplementedError

    def generate_samples(self, trainer: "Trainer", num_samples: int, generator: torch.Generator):
        """Evaluation samples ``(images in [-1, 1], labels or None)``; ``None`` skips evaluation."""
        return None


def seed_for(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of its parts (no Python hash randomization)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def run_state():
    """accelerate's process state, created as the Trainer's ``Accelerator`` will find it.

    ``PartialState()`` is a singleton: built with its defaults before the ``Accelerator`` exists, it
    ignores ``ACCELERATE_USE_CPU`` and a ``accelerate launch --multi_gpu`` run on CPU then trains as
    N independent single processes (measured: each process sees index 0 of 1). Anything that needs
    the device or the process index before the Trainer is built asks here."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


@contextlib.contextmanager
def seed_run(config: TrainingConfig):
    """Around a run's construction and training: the global RNGs (torch, numpy, random) seeded
    with ``config.seed`` -- role construction (copies, LoRA adapters, GAN heads, w-embeddings)
    draws from them -- and, with ``config.deterministic``, PyTorch's deterministic algorithms
    (restored on exit)."""
    from accelerate.utils import set_seed

    set_seed(config.seed)
    if not config.deterministic:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic with a fixed workspace
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]


class StepContext:
    """What a method sees during one micro-step; see the module docstring."""

    def __init__(self, trainer: "Trainer", step: int, micro_step: int):
        self.trainer = trainer
        self.step = step  # optimizer step being computed, 0-based
        self.micro_step = micro_step
        self.num_micro_steps = trainer.config.gradient_accumulation_steps
        self.accelerator = trainer.accelerator
        self.device = trainer.accelerator.device
        self.global_batch_size = trainer.micro_batch_size  # this micro-step, all processes
        self.local_batch_size = trainer.micro_batch_size // trainer.accelerator.num_processes
        start = trainer.accelerator.process_index * self.local_batch_size
        self.local_slice = slice(start, start + self.local_batch_size)
        self.generator = torch.Generator().manual_seed(seed_for(trainer.config.seed, "step", step, micro_step))

    # -- randomness: drawn for the global micro-batch, sliced to this process ------------------
    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(self.global_batch_size, *shape, generator=self.generator)[self.local_slice].to(self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(self.global_batch_size, *shape, generator=self.generator)[self.local_slice].to(self.device)

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        size = (self.global_batch_size, *shape)
        return torch.randint(low, high, size, generator=self.generator)[self.local_slice].to(self.device)

    def sample_indices(self, dataset_size: int) -> torch.Tensor:
        """This process's dataset indices: epochs of reshuffled passes, as a function of the step."""
        first = (self.step * self.num_micro_steps + self.micro_step) * self.global_batch_size
        positions = torch.arange(first, first + self.global_batch_size)[self.local_slice]
        epochs, offsets = positions // dataset_size, positions % dataset_size
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            perm = self.trainer.epoch_permutation(dataset_size, epoch)
            mask = epochs == epoch
            out[mask] = perm[offsets[mask]]
        return out

    # -- models -------------------------------------------------------------------------------
    def model(self, name: str) -> nn.Module:
        """The role as prepared by accelerate (DDP-wrapped on several processes): train through this."""
        return self.trainer.prepared[name]

    def unwrap(self, name: str) -> nn.Module:
        return self.trainer.unwrap(name)

    def ema(self, name: str) -> nn.Module:
        return self.trainer.emas[name].module

    # -- updates ------------------------------------------------------------------------------
    def step_role(self, name: str, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` into role ``name`` only; on the last micro-step also clip its
        gradients, step its optimizer and LR schedule, zero its gradients and update its EMA."""
        self.trainer.step_role(name, loss, last_micro_step=self.micro_step == self.num_micro_steps - 1)


class Trainer:
    def __init__(
        self,
        method: TrainingMethod,
        config: TrainingConfig,
        output_dir: str | os.PathLike,
        *,
        resume: bool = False,
        overwrite: bool = False,
        run_info: Mapping[str, Any] | None = None,
        evaluators: list[Evaluator] | tuple[Evaluator, ...] = (),
        log_with: str | None = "tensorboard",
        progress: bool = True,
    ):
        self.method = method
        self.config = config
        self.output_dir = Path(output_dir)
        self.evaluators = list(evaluators)
        self.progress = progress
        self.run_info = dict(run_info or {})
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=log_with,
            project_dir=str(self.output_dir / "logs"),
        )
        self._check_distributed_type()
        self._check_batch_size()
        self._claim_output_dir(resume=resume, overwrite=overwrite)

        self.prepared: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.lr_schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.emas: dict[str, EMA] = {}
        self.trainable_roles: list[str] = []
        self.frozen_roles: list[str] = []
        self._permutations: dict[tuple[int, int], torch.Tensor] = {}
        self._build_roles(method.roles())

        self.start_step = 0
        self.skipped_steps = 0  # steps with a non-finite loss or gradient (restored by load_checkpoint)
        self._skipping: str | None = None  # why the step in progress updates nothing more
        self._stop_signal: int | None = None
        checkpoint = latest_checkpoint(self.output_dir) if resume else None
        if checkpoint is not None:
            self.start_step = load_checkpoint(self, checkpoint)
        self.last_metrics: dict[str, float] = {}
        self._began = time.perf_counter() - 60 * self._resume_curve()

    def _resume_curve(self) -> float:
        """Drop curve rows after the checkpoint a resumed run restarts from; its minutes so far."""
        path = self.output_dir / CURVE_FILE
        if not path.is_file() or self.start_step == 0:
            return 0.0
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [row for row in rows if row["step"] < self.start_step]  # an evaluation due at start_step runs again
        if self.accelerator.is_main_process:
            path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        return max((row["minutes"] for row in kept), default=0.0)

    # -- setup --------------------------------------------------------------------------------
    @property
    def micro_batch_size(self) -> int:
        return self.config.batch_size // self.config.gradient_accumulation_steps

    def _check_distributed_type(self) -> None:
        """Sharded training (FSDP, DeepSpeed ZeRO) is refused: see docs/memory.md "Multi-GPU"."""
        kind = str(self.accelerator.distributed_type).rsplit(".", 1)[-1]
        if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise RecipeError(
                f"accelerate {kind} is not supported: the Trainer steps one role at a time with its own gradient mean "
                "(DDP semantics, _average_gradients), keeps full EMA copies and evaluates and exports on the main process, "
                "none of which is correct on sharded parameters; launch data parallel (configs/accelerate/multi_gpu.yaml) "
                "with the recipe's memory: levers (`stepdistill plan RECIPE` names the change that fits)"
            )

    def _check_batch_size(self) -> None:
        c, n = self.config, self.accelerator.num_processes
        if c.batch_size % (c.gradient_accumulation_steps * n) != 0:
            raise RecipeError(
                f"training.batch_size ({c.batch_size}) must be divisible by gradient_accumulation_steps "
                f"({c.gradient_accumulation_steps}) x processes ({n})"
            )

    def _claim_output_dir(self, resume: bool, overwrite: bool) -> None:
        """Refuse a directory holding another run unless told; every process checks before any writes."""
        out = self.output_dir
        holds_something = out.exists() and any(out.iterdir())
        if out.exists() and not out.is_dir():
            raise OutputDirError(f"output directory {out} exists and is not a directory")
        if holds_something and not (resume or overwrite):
            what = "a run" if (out / RUN_FILE).exists() else "other files"
            raise OutputDirError(f"output directory {out} already holds {what}; pass --resume to continue it or --overwrite to replace it")
        if resume and holds_something and not (out / RUN_FILE).exists() and not overwrite:
            raise OutputDirError(f"cannot resume: {out} holds files but no run ({RUN_FILE} missing)")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if overwrite and not resume and out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(out)
            info = {"method": type(self.method).__name__, **self.run_info}
            (out / RUN_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        self.accelerator.wait_for_everyone()

    def _build_roles(self, roles: Mapping[str, Role]) -> None:
        device = self.accelerator.device
        for name, role in roles.items():
            if role.optimizer is None:
                role.module.to(device).requires_grad_(False).eval()
                self.prepared[name] = role.module
                self.frozen_roles.append(name)
                continue
            o = role.optimizer
            module = role.module.to(device).train()
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"role '{name}' has an optimizer but no trainable parameters")
            optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
            # LR schedules are stepped by us, once per optimizer step: accelerate's wrapper would
            # step them once per process, making warm-up depend on the number of processes.
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, self.config.max_steps))
            self.prepared[name], self.optimizers[name] = self.accelerator.prepare(module, optimizer)
            self.accelerator.register_for_checkpointing(scheduler)
            self.lr_schedulers[name] = scheduler
            self.trainable_roles.append(name)
            if role.ema is not None:
                self.emas[name] = EMA(module, decay=role.ema.decay)
        for name in roles:
            if name in self.emas or roles[name].ema is None:
                continue
            raise ValueError(f"role '{name}' asks for an EMA but has no optimizer")

    def unwrap(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self.prepared[name])

    def epoch_permutation(self, dataset_size: int, epoch: int) -> torch.Tensor:
        key = (dataset_size, epoch)
        if key not in self._permutations:
            if len(self._permutations) > 4:
                self._permutations.clear()
            g = torch.Generator().manual_seed(seed_for(self.config.seed, "epoch", epoch))
            self._permutations[key] = torch.randperm(dataset_size, generator=g)
        return self._permutations[key]

    # -- one update ---------------------------------------------------------------------------
    def step_role(self, name: str, loss: torch.Tensor, last_micro_step: bool) -> None:
        if name not in self.optimizers:
            raise ValueError(f"role '{name}' has no optimizer; trainable roles: {', '.join(self.trainable_roles)}")
        optimizer = self.optimizers[name]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._skipping is not None:  # an earlier update of this step was non-finite: no more updates
            if last_micro_step:
                optimizer.zero_grad(set_to_none=True)
            return
        self.accelerator.backward(loss / self.config.gradient_accumulation_steps, inputs=params)
        finite = torch.isfinite(loss.detach()).all()
        self._finite_losses[name] = finite & self._finite_losses[name] if name in self._finite_losses else finite
        if not last_micro_step:
            return
        if not self._average_gradients(params, self._finite_losses.pop(name)):
            return self._skip_rest_of_step(optimizer, f"loss of role '{name}'")
        if self.config.max_grad_norm is not None:
            norm = self.accelerator.clip_grad_norm_(params, self.config.max_grad_norm)
            self._step_logs[f"grad_norm/{name}"] = float(norm)
        elif self.config.mixed_precision != "fp16":
            norms = [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else 0.0
        if self.config.mixed_precision != "fp16" and not math.isfinite(float(norm)):  # fp16: the GradScaler skips overflows itself
            return self._skip_rest_of_step(optimizer, f"gradient of role '{name}'")
        optimizer.step()
        self.lr_schedulers[name].step()
        optimizer.zero_grad(set_to_none=True)
        if name in self.emas:
            self.emas[name].update(self.unwrap(name))

    def _skip_rest_of_step(self, optimizer: torch.optim.Optimizer, what: str) -> None:
        optimizer.zero_grad(set_to_none=True)
        self._skipping = f"the {what} is not finite"

    def _average_gradients(self, params: list[torch.Tensor], finite_loss: torch.Tensor) -> bool:
        """Mean of every process's gradients (one flat all-reduce), before clipping and the step;
        returns whether the role's loss was finite on every process.

        Roles run under ``no_sync`` (see :meth:`train_step`): a method may call a role several
        times per step, or backpropagate one loss into one role only (TTUR, GAN heads), which
        DDP's own reducer does not allow; gradients are synchronised here instead, once per
        optimizer step of the role -- the same mean DDP would compute. The loss check travels in
        the same all-reduce, so every process skips the same updates.
        """
        if self.accelerator.num_processes == 1:
            return bool(finite_loss)
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [(~finite_loss).reshape(1).to(grads[0].device, grads[0].dtype)])
        dist.all_reduce(flat)
        finite_everywhere = bool(flat[-1] == 0)
        flat = flat[:-1] / self.accelerator.num_processes
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()
        return finite_everywhere

    def train_step(self, step: int) -> dict[str, float]:
        """All micro-steps of optimizer step ``step``; returns the mean of the method's metrics."""
        self._step_logs: dict[str, float] = {}
        self._skipping, self._finite_losses = None, {}
        sums: dict[str, float] = {}
        lrs = {f"lr/{name}": scheduler.get_last_lr()[0] for name, scheduler in self.lr_schedulers.items()}  # used by this step
        k = self.config.gradient_accumulation_steps
        for micro in range(k):
            with contextlib.ExitStack() as stack:
                for name in self.trainable_roles:  # gradients are averaged in step_role, not by DDP
                    stack.enter_context(self.accelerator.no_sync(self.prepared[name]))
                stack.enter_context(self.accelerator.autocast())
                metrics = self.method.training_step(StepContext(self, step, micro))
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value) / k
        if self._skipping is not None:
            self._count_skipped(step)
        return {**sums, **lrs, **self._step_logs, "skipped_steps": float(self.skipped_steps)}

    def _count_skipped(self, step: int) -> None:
        self.skipped_steps += 1
        c = self.config
        if self.skipped_steps > c.max_skipped_steps:
            latest = latest_checkpoint(self.output_dir)
            raise TrainingDiverged(
                f"step {step}: {self._skipping} ({self.skipped_steps} steps skipped, more than training.max_skipped_steps = "
                f"{c.max_skipped_steps}): stopping; {latest.name if latest else 'no checkpoint yet'} in {self.output_dir} is the "
                "last good state (lower the learning rates or clip harder with training.max_grad_norm, then --resume)"
            )
        if self.accelerator.is_main_process:
            tqdm.write(f"step {step}: {self._skipping}: step skipped ({self.skipped_steps} of at most {c.max_skipped_steps})")

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Train from ``start_step`` to ``config.max_steps``; returns the last evaluation's metrics."""
        c, acc = self.config, self.accelerator
        acc.init_trackers("train", config=_flat_hparams(self.run_info))
        bar = tqdm(
            total=c.max_steps,
            initial=self.start_step,
            disable=not (self.progress and acc.is_main_process),
            desc="train",
            dynamic_ncols=True,
        )
        evaluation_due = lambda step: (c.eval_every and step % c.eval_every == 0) or step == c.max_steps  # noqa: E731
        try:
            with self._stop_signals():
                if self.start_step > 0 and evaluation_due(self.start_step):  # resumed where an evaluation was due (and may have crashed)
                    self.evaluate(self.start_step)
                for step in range(self.start_step, c.max_steps):
                    logs = self.train_step(step)
                    done = step + 1
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if not k.startswith(("lr/", "grad_norm/", "skipped"))})
                    if done % c.log_every == 0 or done == c.max_steps:
                        acc.log(_mean_over_processes(acc, logs), step=done)
                    stop = self._agreed_stop_signal()
                    if done % c.checkpoint_every == 0 or done == c.max_steps or stop:
                        save_checkpoint(self, done)  # before the evaluation: a crash there loses no training
                    if stop:
                        name = signal.Signals(stop).name
                        raise TrainingInterrupted(f"{name} at step {done}: {checkpoint_name(done)} written in {self.output_dir}; "
                                                  "continue with --resume", stop)
                    if evaluation_due(done):
                        self.evaluate(done)
        finally:
            bar.close()
            for tracker in acc.trackers:  # the process group stays up for the caller's export: see finish()
                tracker.finish()
        return self.last_metrics

    @contextlib.contextmanager
    def _stop_signals(self):
        """SIGTERM and SIGINT ask for a checkpoint and a stop at the next step boundary; a second
        SIGINT interrupts at once. (Only the main thread can take signals: elsewhere, no change.)"""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request(signum, frame):
            if signum == signal.SIGINT and self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.accelerator.is_main_process:
                tqdm.write(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (Ctrl-C again: stop now)")

        previous = {sig: signal.signal(sig, request) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _agreed_stop_signal(self) -> int | None:
        """The stop signal any process received (every process stops at the same step)."""
        signum = self._stop_signal or 0
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            flag = torch.tensor([signum], device=self.accelerator.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum or None

    def finish(self) -> None:
        """After the run's last collective step (export on the main process, a barrier): end
        accelerate's training (destroys the process group of a multi-process launch)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    def evaluate(self, step: int) -> dict[str, float]:
        """Samples from the method (main process), a grid PNG, and the evaluators' metrics."""
        acc = self.accelerator
        metrics: dict[str, float] = {}
        if acc.is_main_process:
            with global_rngs_restored():  # whatever the evaluators draw, the run's RNG states do not depend on evaluations
                metrics = self._evaluate(step)
        acc.wait_for_everyone()
        self.last_metrics = metrics
        return metrics

    def _evaluate(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        generator = torch.Generator().manual_seed(seed_for(self.config.seed, "eval"))
        with torch.no_grad():
            samples = self.method.generate_samples(self, self.config.num_eval_samples, generator)
        if samples is None:
            return metrics
        images, labels = samples
        nrow = 10 if labels is not None else None
        save_image_grid(images[:100], self.output_dir / "samples" / f"step_{step:08d}.png", nrow=nrow)
        for evaluator in self.evaluators:
            metrics.update({f"eval/{k}": float(v) for k, v in evaluator(images, labels).items()})
        if metrics:
            self.accelerator.log(metrics, step=step)
            tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            row = {"step": step, "minutes": (time.perf_counter() - self._began) / 60, **{k.removeprefix("eval/"): v for k, v in metrics.items()}}
            with open(self.output_dir / CURVE_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
        return metrics


@contextlib.contextmanager
def global_rngs_restored():
    """Run the body, then put torch's (CPU and CUDA), numpy's and Python's global RNG states back."""
    import random

    import numpy as np

    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


def lr_lambda(o: OptimizerConfig, max_steps: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to 0 at ``max_steps``."""

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.lr_scheduler == "constant":
            return 1.0
        progress = (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _mean_over_processes(accelerator: Accelerator, logs: Mapping[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1 or not logs:
        return dict(logs)
    keys = sorted(logs)
    values = torch.tensor([logs[k] for k in keys], device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist()))


def _flat_hparams(info: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Tensorboard hparams take scalars only: flatten nested sections, stringify lists."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_hparams(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


__all__ = ["Evaluator", "Role", "StepContext", "Trainer", "TrainingMethod", "seed_for", "seed_run"]
