"""Latency at a fixed batch: NFE, ms per image, images/s and peak memory, warm-up excluded.

NFE counts the denoisers' forward passes per generated image, measured with forward hooks:
batched classifier-free guidance (cond + uncond in one call) counts as 2 evaluations per image;
a pipeline with several denoising networks (a hybrid of teacher and student) counts them all.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the timed calls minus the
memory allocated before them ("cuda_max_allocated"); on CPU, the peak resident set size during
the timed calls minus the RSS before them, sampled every 2 ms from ``/proc/self/statm``
("cpu_rss_delta") -- where that file is missing, the rise of ``ru_maxrss`` ("cpu_max_rss_delta",
zero when an earlier peak of the process was higher).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Callable, Sequence

import torch
from torch import nn

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


class _RssSampler:
    """Samples the process's RSS in a background thread while in its ``with`` block."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = _rss_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            time.sleep(self.interval)

    def __enter__(self) -> "_RssSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    generate: Callable[[], int],
    denoiser: nn.Module | Sequence[nn.Module] | None,
    device: torch.device | str = "cpu",
    repeats: int = 3,
) -> dict:
    """Time ``generate()`` (which makes one fixed batch and returns its size) after one warm-up call.

    Returns ``{"nfe", "ms_per_image", "images_per_second", "peak_memory_mb", "peak_memory_kind",
    "latency_batch_size", "latency_repeats"}``; timings are the median of ``repeats`` calls.
    """
    device = torch.device(device)
    generate()  # warm-up: lazy initialisation, allocator growth, kernel selection
    modules = [] if denoiser is None else [denoiser] if isinstance(denoiser, nn.Module) else list(denoiser)
    counter = _ForwardCounter(modules)
    durations, batch = [], 0
    try:
        if device.type == "cuda":
            _synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        sampler = _RssSampler() if device.type != "cuda" and _rss_bytes() is not None else None
        max_rss_before = _max_rss_bytes() if device.type != "cuda" and sampler is None else None
        if sampler is not None:
            sampler.__enter__()
        try:
            for _ in range(repeats):
                _synchronize(device)
                began = time.perf_counter()
                batch = generate()
                _synchronize(device)
                durations.append(time.perf_counter() - began)
        finally:
            if sampler is not None:
                sampler.__exit__(None, None, None)
    finally:
        counter.close()
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) - before, "cuda_max_allocated"
    elif sampler is not None:
        peak, kind = sampler.peak - sampler.baseline, "cpu_rss_delta"
    else:
        peak, kind = _max_rss_bytes() - max_rss_before, "cpu_max_rss_delta"
    seconds = statistics.median(durations)
    return {
        "nfe": counter.rows / (batch * repeats) if modules and batch else None,
        "ms_per_image": 1000.0 * seconds / batch,
        "images_per_second": batch / seconds if seconds > 0 else None,
        "peak_memory_mb": max(peak, 0) / 2**20,
        "peak_memory_kind": kind,
        "latency_batch_size": batch,
        "latency_repeats": repeats,
    }
