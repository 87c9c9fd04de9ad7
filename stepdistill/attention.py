"""Attention backend of the networks a run builds: xformers where it can run, else PyTorch SDPA.

diffusers' attention processors call ``torch.nn.functional.scaled_dot_product_attention``
(SDPA) by default: flash / memory-efficient kernels on GPUs, the flash kernel on CPUs. xformers
is an optional package (CUDA only; install a build that matches your torch, README "xformers":
there is no pip extra for it, since a bare ``pip install xformers`` may replace your torch).
The recipe switch ``memory.attention`` picks the backend:

- ``auto``: xformers when the package is importable and the run's device is CUDA, else SDPA;
- ``sdpa``: diffusers' default processors (xformers processors, if any, are switched back);
- ``xformers``: xformers, or a warning and SDPA where it cannot run.

:func:`configure_attention` applies it to one diffusers network through diffusers' own
``enable_xformers_memory_efficient_attention`` / ``disable_xformers_memory_efficient_attention``
and returns the backend in use, which every run logs (``stepdistill distill`` prints it and
writes it to ``run.json``).
"""

from __future__ import annotations

import importlib.util
import warnings

BACKENDS = ("auto", "sdpa", "xformers")


def xformers_installed() -> bool:
    """xformers imports with its kernels (a wheel built for another torch fails here)."""
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or the C++ extension built against another torch
        return False
    return True


def xformers_usable(device) -> bool:
    """xformers is importable and ``device`` is a CUDA device (its kernels are CUDA only)."""
    return xformers_installed() and str(device).startswith("cuda")


def processor_classes(model) -> set[str]:
    """Class names of the attention processors in ``model`` (every module with a ``processor``)."""
    return {type(m.processor).__name__ for m in model.modules() if getattr(m, "processor", None) is not None}


def _uses_xformers(model) -> bool:
    return any("XFormers" in name for name in processor_classes(model))


def resolve_backend(backend: str, device) -> str:
    """The backend ``backend`` means on ``device``: "xformers" or "sdpa" (warns when xformers was asked for and cannot run)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend in ("auto", "xformers") and xformers_usable(device):
        return "xformers"
    if backend == "xformers":
        warnings.warn(
            f"memory.attention: xformers requested but it cannot run here (installed: {xformers_installed()}, device: {device}); "
            "using PyTorch SDPA",
            stacklevel=2,
        )
    return "sdpa"


def configure_attention(model, backend: str = "auto", device=None) -> str:
    """Set the attention backend of a diffusers network for a run on ``device`` (default: where
    the network's parameters are); returns the backend in use, "xformers" or "sdpa"."""
    if device is None:
        device = next(model.parameters()).device
    chosen = resolve_backend(backend, device)
    if chosen == "xformers":
        model.enable_xformers_memory_efficient_attention()
    elif _uses_xformers(model):
        model.disable_xformers_memory_efficient_attention()
    return chosen


__all__ = ["BACKENDS", "configure_attention", "processor_classes", "resolve_backend", "xformers_installed", "xformers_usable"]
