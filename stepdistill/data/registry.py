"""Datasets by name. ``register_dataset("digits", factory, "8x8 digits, 10 classes")`` makes
``open_images("digits", ...)`` call ``factory(**options)`` with those of open_images' options
that the factory's signature accepts (all of them if it takes ``**kwargs``).

A package can register without the core importing it: an entry point in the group
``stepdistill.datasets`` whose name is the dataset name, pointing at the factory (or at a
module or function that calls ``register_dataset`` when loaded). Entry points are loaded only
when a name is not registered yet.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from ..errors import DataError

ENTRY_POINT_GROUP = "stepdistill.datasets"

_registry: dict[str, tuple[Callable, str]] = {}


def register_dataset(name: str, factory: Callable, description: str = "") -> None:
    """Make ``open_images(name)`` return ``factory(**options)`` (an ImageDataset); replaces an
    earlier registration of ``name``."""
    if not callable(factory):
        raise TypeError(f"the factory of dataset {name!r} must be callable; got {factory!r}")
    _registry[name] = (factory, description)


def registered_datasets() -> dict[str, str]:
    """Names and descriptions of the registered datasets and of installed entry points, sorted."""
    names = {name: description for name, (_, description) in _registry.items()}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        names.setdefault(point.name, f"entry point {point.value}")
    return dict(sorted(names.items()))


def dataset_factory(name: str) -> Callable | None:
    """The factory registered as ``name`` (loading its entry point on first use), or None."""
    if name not in _registry:
        point = next((p for p in entry_points(group=ENTRY_POINT_GROUP) if p.name == name), None)
        if point is None:
            return None
        try:
            loaded = point.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin: one line for the user
            raise DataError(f"dataset {name!r}: its entry point {point.value} failed to load: {exc}".splitlines()[0]) from None
        if name not in _registry:  # the entry point is the factory itself, not a module that registers
            register_dataset(name, loaded, (loaded.__doc__ or "").strip().split("\n")[0])
    return _registry[name][0]
