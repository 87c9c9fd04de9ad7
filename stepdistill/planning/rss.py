"""The peak memory of real training steps on CPU, to check the estimate against.

:func:`measure_training_steps` starts a fresh Python process that builds one role's network
with random weights on the CPU, makes its inputs, and records its resident set size (VmRSS) as
the *baseline*; it then resets the kernel's high-water mark (``/proc/self/clear_refs``) and runs
``steps`` training steps as the Trainer does (forward, MSE loss, backward, ``AdamW(foreach=True)``
step -- the CUDA default --, ``zero_grad(set_to_none=True)``). The peak increase is
``VmHWM - baseline``: optimizer states (created in the first step), gradients, activations and
the optimizer's scratch. Two steps, so the second runs with the states already resident.

glibc's malloc keeps freed memory mapped unless told otherwise, which makes RSS remember
tensors long dead; the process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every tensor
larger than 64 KiB is its own mapping, returned when freed (``raw_malloc=True`` measures the
default allocator instead). Linux only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

from ..errors import StepdistillError
from .estimate import MemoryEstimate, Workload
from .roles import RoleSpec


@dataclass(frozen=True)
class MeasuredStep:
    baseline: int  # bytes resident after building the network and its inputs
    peak_increase: int  # VmHWM - baseline over the training steps
    parameters: int
    seconds: float


def estimated_increase(estimate: MemoryEstimate) -> int:
    """What :class:`MeasuredStep.peak_increase` measures, from an estimate: the peak less what
    exists before the first step (weights and EMA copies)."""
    return estimate.peak - sum(r.weights + r.ema for r in estimate.roles)


def measure_training_steps(spec: RoleSpec, workload: Workload, steps: int = 2, warmup: bool = False, raw_malloc: bool = False,
                           threads: int = 1, timeout: float = 600) -> MeasuredStep:
    """Train ``spec`` (class + config, fp32, trained) for ``steps`` steps in a fresh process; see the module docstring."""
    if spec.module_factory is not None or spec.config is None:
        raise StepdistillError("measure_training_steps needs a role given as model_class + config (it is rebuilt in another process)")
    if not spec.is_trained or spec.param_dtype != spec.trainable_dtype:
        raise StepdistillError("measure_training_steps measures a trained role in one dtype (no autocast on CPU)")
    cls = spec.model_class
    job = {
        "model_class": cls if isinstance(cls, str) or cls is None else f"{cls.__module__}.{cls.__qualname__}",
        "config": dict(spec.config), "trainable": spec.trainable, "lora_rank": spec.lora_rank,
        "lora_targets": list(spec.lora_targets), "dtype": str(spec.param_dtype).removeprefix("torch."),
        "gradient_checkpointing": spec.gradient_checkpointing, "workload": asdict(workload), "steps": steps, "warmup": warmup,
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if not raw_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    result = subprocess.run(
        [sys.executable, "-m", "stepdistill.planning.rss", json.dumps(job)], env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(f"measurement process failed:\n{result.stderr[-3000:]}")
    return MeasuredStep(**json.loads(result.stdout.strip().splitlines()[-1]))


def _memory_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _run(job: dict) -> dict:
    import gc
    import time

    import torch

    from .activations import example_inputs

    torch.manual_seed(0)
    spec = RoleSpec("measured", model_class=job["model_class"], config=job["config"], trainable=job["trainable"],
                    lora_rank=job["lora_rank"], lora_targets=tuple(job["lora_targets"]), param_dtype=getattr(torch, job["dtype"]),
                    trainable_dtype=getattr(torch, job["dtype"]), gradient_checkpointing=job["gradient_checkpointing"])
    from .roles import build_module

    module = build_module(spec, "cpu").train()
    if spec.gradient_checkpointing:
        module.enable_gradient_checkpointing()
    w = Workload(**job["workload"])
    inputs = example_inputs(module, w.batch_size, w.height, w.width, spec.param_dtype, w.text_tokens, device="cpu")
    generator = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in inputs.items()}
    trained = [p for p in module.parameters() if p.requires_grad]

    def train(steps: int) -> None:
        optimizer = torch.optim.AdamW(trained, lr=1e-5, foreach=True)
        for _ in range(steps):
            out = module(**inputs)
            out = out.sample if hasattr(out, "sample") else out[0]
            loss = torch.nn.functional.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
            del out
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if job["warmup"]:
        train(1)  # its optimizer (and states) go with it; kernels, thread pools, caches stay
    gc.collect()
    baseline = _memory_status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    train(job["steps"])
    seconds = time.perf_counter() - start
    peak = _memory_status()["VmHWM"]
    return {"baseline": baseline, "peak_increase": peak - baseline, "parameters": sum(p.numel() for p in module.parameters()),
            "seconds": round(seconds, 2)}


if __name__ == "__main__":
    print(json.dumps(_run(json.loads(sys.argv[1]))))


__all__ = ["MeasuredStep", "estimated_increase", "measure_training_steps"]
