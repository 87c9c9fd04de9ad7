"""Latency at a fixed batch: NFE, ms per image, images/s and peak memory, warm-up excluded.

NFE counts the denoisers' forward passes per generated image, measured with forward hooks:
batched classifier-free guidance (cond + uncond in one call) counts as 2 evaluations per image;
a pipeline with several denoising networks (a hybrid of teacher and student) counts them all.

Peak memory (MiB), what a user needs to run the model, never a difference that rounds to 0:

- CUDA: ``torch.cuda.max_memory_allocated`` over the timed calls (peak stats reset before
  them), weights included ("cuda_max_allocated");
- CPU: the process's peak resident set size (``VmHWM`` of ``/proc/self/status``) over the timed
  calls, after resetting the high-water mark to the current RSS (``echo 5 > /proc/self/clear_refs``,
  Linux >= 4.0) ("cpu_peak_rss"); where that cannot be reset, the peak RSS since the process
  started (``ru_maxrss``, "cpu_peak_rss_since_start"). Either includes everything the process
  holds (every loaded model, the reference features).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Sequence

import torch
from torch import nn


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process to its current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident set size: ``VmHWM`` (Linux), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kilobytes elsewhere


class _ForwardCounter:
    """Counts the rows (samples) some modules process, through forward hooks."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.rows = 0
        self._handles = [module.register_forward_hook(self._hook, with_kwargs=True) for module in modules]

    def _hook(self, module, args, kwargs, output) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if torch.is_tensor(sample):
            self.rows += int(sample.shape[0])

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    generate: Callable[[], int],
    denoiser: nn.Module | Sequence[nn.Module] | None,
    device: torch.device | str = "cpu",
    repeats: int = 3,
) -> dict:
    """Time ``generate()`` (which makes one fixed batch and returns its size) after one warm-up call.

    Returns ``{"nfe", "ms_per_image", "images_per_second", "peak_memory_mib", "peak_memory_kind",
    "latency_batch_size", "latency_repeats"}``; timings are the median of ``repeats`` calls.
    """
    device = torch.device(device)
    generate()  # warm-up: lazy initialisation, allocator growth, kernel selection
    modules = [] if denoiser is None else [denoiser] if isinstance(denoiser, nn.Module) else list(denoiser)
    counter = _ForwardCounter(modules)
    durations, batch = [], 0
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        kind = "cuda_max_allocated"
    else:
        kind = "cpu_peak_rss" if _reset_peak_rss() else "cpu_peak_rss_since_start"
    try:
        for _ in range(repeats):
            synchronize(device)
            began = time.perf_counter()
            batch = generate()
            synchronize(device)
            durations.append(time.perf_counter() - began)
    finally:
        counter.close()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    seconds = statistics.median(durations)
    return {
        "nfe": counter.rows / (batch * repeats) if modules and batch else None,
        "ms_per_image": 1000.0 * seconds / batch,
        "images_per_second": batch / seconds if seconds > 0 else None,
        "peak_memory_mib": peak / 2**20,
        "peak_memory_kind": kind,
        "latency_batch_size": batch,
        "latency_repeats": repeats,
    }
