"""Plugins: benchmarks (and anyone else) register datasets, feature spaces, benchmarks and
teacher names without the core importing them.

A plugin is a module named by a Python entry point of group ``stepdistill.plugins``; importing
it registers what it provides (stepdistill's own digits and shapes benchmarks are plugins, see
pyproject.toml). Registries call :func:`load_plugins` when a name is not found, so
``open_images("digits")`` works while nothing below the benchmark imports it.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

GROUP = "stepdistill.plugins"
_loaded = False


def load_plugins() -> None:
    """Import every plugin module once (entry points of group ``stepdistill.plugins``)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry in entry_points(group=GROUP):
        importlib.import_module(entry.value.split(":")[0])


__all__ = ["GROUP", "load_plugins"]
