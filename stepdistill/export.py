"""Export students and teachers as drop-in diffusers pipeline directories."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

PIPELINE_SOURCE = Path(__file__).resolve().parent.parent / "pipelines" / "class_conditional_pipeline.py"


def _pipeline_source() -> Path:
    """The shipped pipeline file, from a source checkout or an installed wheel."""
    try:
        from . import pipelines as installed  # wheel / editable install: stepdistill.pipelines

        candidate = Path(installed.__file__).parent / "class_conditional_pipeline.py"
        if candidate.exists():
            return candidate
    except ImportError:
        pass
    return PIPELINE_SOURCE


def save_class_conditional_pipeline(unet, scheduler, output_dir: str | os.PathLike) -> Path:
    """Write ``unet`` + ``scheduler`` as a ClassConditionalPipeline directory that loads with
    ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` (pipeline code inside)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    shutil.copyfile(_pipeline_source(), out / "class_conditional_pipeline.py")
    index = {
        "_class_name": ["class_conditional_pipeline", "ClassConditionalPipeline"],
        "_diffusers_version": __import__("diffusers").__version__,
        "unet": ["diffusers", type(unet).__name__],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
