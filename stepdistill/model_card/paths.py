"""Paths in a card: relative to the working directory, never the exporting machine's absolute paths; directories inside an installed package."""

from __future__ import annotations

import importlib.util
import os
import site
import sysconfig
from pathlib import Path


# -- paths ------------------------------------------------------------------------------------------
def portable_path(path: str | os.PathLike | None) -> str | None:
    """``path`` as a card may print it: never an absolute path of this machine.

    A relative name that is no path here (a Hub id, a registered teacher name) stays as given; a
    local path (absolute, or existing) becomes relative to the working directory when it lies
    inside it (as the user wrote it, if relative), else its last component.
    """
    if path is None:
        return None
    text = os.fspath(path)
    if not (os.path.isabs(text) or os.path.exists(text)):
        return text
    absolute = os.path.abspath(text)
    cwd = os.getcwd()
    if os.path.commonpath([absolute, cwd]) == cwd and absolute != cwd:
        return Path(os.path.relpath(absolute, cwd)).as_posix()
    return os.path.basename(os.path.normpath(absolute))


def inside_installed_package(path: str | os.PathLike) -> str | None:
    """Where ``path`` lies inside an installed (importable) Python package -- site-packages, or a
    package imported from a source checkout (an editable install such as stepdistill's own
    ``digits/weights``) -- that location; else None. Such directories are package data that
    nothing may rewrite."""
    resolved = Path(path).resolve()
    roots = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")} | set(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        roots.add(site.getusersitepackages())
    for root in roots:
        root = Path(root).resolve()
        if root in resolved.parents or root == resolved:
            return str(root)
    # the top-most directory above `path` that is a package (has __init__.py) and is importable as one
    top = None
    for candidate in [resolved, *resolved.parents]:
        if (candidate / "__init__.py").is_file():
            top = candidate
        elif top is not None:
            break
    if top is None:
        return None
    try:
        spec = importlib.util.find_spec(top.name)
    except (ImportError, ValueError):
        return None
    locations = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec is not None else []
    return str(top) if top in locations else None
