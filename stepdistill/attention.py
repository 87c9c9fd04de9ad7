"""Attention backend: xformers where it can run (optional `gpu` extra, CUDA only), else PyTorch SDPA.

diffusers' attention processors use ``torch.nn.functional.scaled_dot_product_attention`` by
default, which is what runs on CPU. ``configure_attention(model, "auto")`` turns on xformers
memory-efficient attention only when xformers is importable and the model lives on a CUDA
device; asking for ``"xformers"`` where it cannot run warns and keeps SDPA.
"""

from __future__ import annotations

import importlib.util
import warnings

BACKENDS = ("auto", "sdpa", "xformers")


def xformers_usable(device) -> bool:
    return importlib.util.find_spec("xformers") is not None and str(device).startswith("cuda")


def configure_attention(model, backend: str = "auto") -> str:
    """Set the attention backend of a diffusers model; returns the backend in use."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    device = next(model.parameters()).device
    if backend in ("auto", "xformers") and xformers_usable(device):
        model.enable_xformers_memory_efficient_attention()
        return "xformers"
    if backend == "xformers":
        warnings.warn(
            f"xformers requested but it cannot run here (installed: {importlib.util.find_spec('xformers') is not None}, "
            f"device: {device}); using PyTorch SDPA",
            stacklevel=2,
        )
    if hasattr(model, "set_default_attn_processor"):
        model.set_default_attn_processor()
    return "sdpa"
