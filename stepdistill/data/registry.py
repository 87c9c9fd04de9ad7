"""Datasets by name. ``register_dataset("digits", factory, "8x8 digits, 10 classes")`` makes
``open_images("digits", ...)`` call ``factory(**options)`` with those of open_images' options
that the factory's signature accepts (all of them if it takes ``**kwargs``).

A package can register without the core importing it: a plugin module (entry point group
``stepdistill.plugins``, see :mod:`stepdistill.plugins`) that calls ``register_dataset`` when
imported. Plugins are loaded only when a name is not registered yet.
"""

from __future__ import annotations

from collections.abc import Callable

from ..plugins import load_plugins

_registry: dict[str, tuple[Callable, str]] = {}


def register_dataset(name: str, factory: Callable, description: str = "") -> None:
    """Make ``open_images(name)`` return ``factory(**options)`` (an ImageDataset); replaces an
    earlier registration of ``name``."""
    if not callable(factory):
        raise TypeError(f"the factory of dataset {name!r} must be callable; got {factory!r}")
    _registry[name] = (factory, description)


def registered_datasets() -> dict[str, str]:
    """Names and descriptions of the registered datasets (plugins included), sorted."""
    load_plugins()
    return dict(sorted((name, description) for name, (_, description) in _registry.items()))


def dataset_factory(name: str) -> Callable | None:
    """The factory registered as ``name`` (loading the plugins on first miss), or None."""
    if name not in _registry:
        load_plugins()
    entry = _registry.get(name)
    return entry[0] if entry else None
