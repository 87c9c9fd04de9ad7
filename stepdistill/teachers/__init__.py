"""Teacher adapters, one per model family, behind :class:`~stepdistill.teachers.base.Teacher`.

:func:`load_teacher` reads a diffusers pipeline directory (or, for SD/SDXL, a single
checkpoint file) and returns the right adapter.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Callable

from ..errors import TeacherLoadError
from .base import Conditioning, Teacher

# family -> (module, class). Modules are imported lazily so a pixel-only user never imports
# text encoders.
FAMILIES: dict[str, tuple[str, str]] = {
    "pixel": ("stepdistill.teachers.pixel", "PixelUNetTeacher"),
    "sd": ("stepdistill.teachers.stable_diffusion", "StableDiffusionTeacher"),
    "sdxl": ("stepdistill.teachers.sdxl", "StableDiffusionXLTeacher"),
    "sd3": ("stepdistill.teachers.sd3", "StableDiffusion3Teacher"),
    "flux": ("stepdistill.teachers.flux", "FluxTeacher"),
    "dit": ("stepdistill.teachers.dit", "DiTTeacher"),
}

# diffusers pipeline class name (model_index.json "_class_name") -> family
PIPELINE_FAMILIES: dict[str, str] = {
    "DDPMPipeline": "pixel",
    "DDIMPipeline": "pixel",
    "ClassConditionalPipeline": "pixel",
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "DiTPipeline": "dit",
}

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")

# name -> function returning a pipeline directory: teachers a plugin ships ("digits")
TEACHER_NAMES: dict[str, Callable[[], "str | os.PathLike"]] = {}


def register_teacher(name: str, locate: Callable[[], "str | os.PathLike"]) -> None:
    """Let recipes name a teacher a plugin ships (``teacher.path: digits``)."""
    TEACHER_NAMES[name] = locate


def resolve_teacher_path(path: str | os.PathLike) -> str:
    """A registered teacher name -> its directory; anything else is returned as given."""
    path = os.fspath(path)
    if not os.path.exists(path):
        from ..plugins import load_plugins

        load_plugins()
        if path in TEACHER_NAMES:
            located = os.fspath(TEACHER_NAMES[path]())
            if not os.path.isfile(os.path.join(located, "model_index.json")):
                raise TeacherLoadError(f"the teacher registered as {path!r} is missing ({located})")
            return located
    return path


def teacher_class(family: str) -> type[Teacher]:
    if family not in FAMILIES:
        raise TeacherLoadError(f"unsupported model family {family!r}; supported: {', '.join(FAMILIES)}")
    module, name = FAMILIES[family]
    return getattr(importlib.import_module(module), name)


def detect_family(path: str | os.PathLike) -> str:
    """The family of a diffusers pipeline directory, from its model_index.json."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TeacherLoadError(f"teacher path does not exist: {path}")
    if os.path.isfile(path):
        raise TeacherLoadError(
            f"{path} is a single file: pass family='sd' or 'sdxl' (CLI: --family) to load it with from_single_file"
        )
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise TeacherLoadError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    try:
        with open(index_path) as f:
            class_name = json.load(f).get("_class_name")
    except (OSError, json.JSONDecodeError) as exc:
        raise TeacherLoadError(f"cannot read {index_path}: {exc}") from None
    if isinstance(class_name, (list, tuple)):
        class_name = class_name[-1]
    family = PIPELINE_FAMILIES.get(class_name)
    if family is None:
        raise TeacherLoadError(
            f"unsupported pipeline class {class_name!r} in {index_path}; supported: {', '.join(sorted(PIPELINE_FAMILIES))}"
        )
    return family


def load_teacher(path: str | os.PathLike, family: str | None = None, **kwargs) -> Teacher:
    """Load a teacher from a diffusers directory (any family) or a single file (``family`` = sd / sdxl)."""
    path = resolve_teacher_path(path)
    if family is None:
        family = detect_family(path)
    elif not os.path.exists(path):
        raise TeacherLoadError(f"teacher path does not exist: {path}")
    cls = teacher_class(family)
    if os.path.isfile(path):
        if not hasattr(cls, "from_single_file"):
            raise TeacherLoadError(f"family {family!r} cannot be loaded from a single file; pass a diffusers directory")
        return cls.from_single_file(path, **kwargs)
    return cls.from_pretrained(path, **kwargs)


__all__ = [
    "Conditioning",
    "FAMILIES",
    "PIPELINE_FAMILIES",
    "Teacher",
    "detect_family",
    "load_teacher",
    "register_teacher",
    "resolve_teacher_path",
    "teacher_class",
]
