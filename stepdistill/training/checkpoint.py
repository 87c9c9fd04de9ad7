"""Run directories and their checkpoints.

A run directory looks like::

    run/
      run.json                   recipe + method name: marks the directory as holding a run
      logs/                      tensorboard
      samples/step_00001000.png  evaluation grids
      checkpoint-00001000/       FULL state at step 1000 (see below)
      checkpoint-00002000/

A checkpoint holds what ``accelerate``'s ``save_state`` writes (every trainable role's weights
as safetensors, optimizers, LR schedulers, RNG states of every process), the EMA weights as
``ema_<role>.safetensors``, and ``trainer_state.json`` (step, EMA update counts, the number of
steps skipped for non-finite values, the class and config of every role so
:func:`load_trained_model` can rebuild them).

Writes are atomic: everything goes to ``.checkpoint-<step>.tmp/`` in the same folder, which is
renamed to ``checkpoint-<step>/`` only once complete, so a crash mid-save leaves the previous
checkpoints intact and no partial one is ever picked up on resume. ``trainer_state.json`` is
written last, and a directory without it is never loaded.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import write_json
from ..errors import OutputDirError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMP_PREFIX = ".checkpoint-"
STATE_FILE = "trainer_state.json"
RUN_FILE = "run.json"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete temporaries left by a save that never finished."""
    for child in Path(run_dir).glob(TEMP_PREFIX + "*"):
        shutil.rmtree(child, ignore_errors=True)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def accelerate_model_file(index: int) -> str:
    """The file ``accelerate.save_state`` writes the ``index``-th prepared model to."""
    return "model.safetensors" if index == 0 else f"model_{index}.safetensors"


def save_checkpoint(trainer, step: int) -> Path:
    """Write the trainer's full state atomically; every process must call this."""
    accelerator = trainer.accelerator
    run_dir = Path(trainer.output_dir)
    final = run_dir / checkpoint_name(step)
    temp = run_dir / f"{TEMP_PREFIX}{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()  # every process has written its RNG states into temp before it is renamed
    if accelerator.is_main_process:
        roles = {}
        for index, name in enumerate(trainer.trainable_roles):
            roles[name] = {**_module_spec(trainer.unwrap(name)), "weights": accelerate_model_file(index)}
        for name in trainer.frozen_roles:
            roles[name] = {**_module_spec(trainer.unwrap(name)), "weights": None}
        ema_updates = {}
        for name, ema in trainer.emas.items():
            save_file(_contiguous(ema.state_dict()), str(temp / f"ema_{name}.safetensors"))
            ema_updates[name] = ema.num_updates
            roles[name]["ema_weights"] = f"ema_{name}.safetensors"
        state = {"step": step, "ema_updates": ema_updates, "skipped_steps": trainer.skipped_steps, "roles": roles}
        write_json(temp / STATE_FILE, state)
        if final.exists():  # a re-save of the same step (e.g. the final one): replace it
            shutil.rmtree(final)
        os.replace(temp, final)
        prune_checkpoints(run_dir, trainer.config.keep_checkpoints)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(trainer, path: str | os.PathLike) -> int:
    """Restore the trainer's full state from ``path``; returns the step it was saved at."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    trainer.accelerator.load_state(str(path))
    for name, ema in trainer.emas.items():
        weights = load_file(str(path / f"ema_{name}.safetensors"), device=str(trainer.accelerator.device))
        ema.load_state_dict(weights, state["ema_updates"][name])
    trainer.skipped_steps = int(state.get("skipped_steps", 0))
    return int(state["step"])


def load_trained_model(
    run_dir: str | os.PathLike,
    role: str,
    ema: bool = True,
    checkpoint: str | os.PathLike | None = None,
) -> torch.nn.Module:
    """Rebuild a trained role from a run directory (its latest checkpoint unless given).

    Returns the EMA weights when ``ema`` is true and the role has an EMA, else the raw weights.
    The role's class must be constructible from its config (diffusers ``ConfigMixin`` models).
    """
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None or not (path / STATE_FILE).is_file():
        raise OutputDirError(f"no complete checkpoint in {run_dir}")
    roles = json.loads((path / STATE_FILE).read_text())["roles"]
    if role not in roles:
        raise OutputDirError(f"run {run_dir} has no role '{role}'; it has {', '.join(roles)}")
    spec = roles[role]
    if spec.get("config") is None:
        raise OutputDirError(f"role '{role}' ({spec['class']}) has no config to rebuild it from")
    module_name, _, class_name = spec["class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    model = cls.from_config(spec["config"])
    if ema and spec.get("ema_weights"):
        weights = load_file(str(path / spec["ema_weights"]))
    elif spec.get("weights"):
        weights = {_strip_wrapper(k): v for k, v in load_file(str(path / spec["weights"])).items()}
    else:
        raise OutputDirError(f"role '{role}' is frozen: its weights are not part of the run")
    model.load_state_dict(weights)
    return model.eval()


def load_role_weights(checkpoint: str | os.PathLike, role: str, module: torch.nn.Module, ema: bool = True) -> torch.nn.Module:
    """Put a role's saved weights into ``module`` (built the way the run built it, e.g. with its
    LoRA adapters): the EMA weights into a copy when ``ema`` and the role has them, else the raw
    weights into ``module`` itself. Returns the loaded module."""
    import copy

    path = Path(checkpoint)
    if not (path / STATE_FILE).is_file():
        raise OutputDirError(f"{path} is not a complete checkpoint ({STATE_FILE} missing)")
    roles = json.loads((path / STATE_FILE).read_text())["roles"]
    if role not in roles:
        raise OutputDirError(f"checkpoint {path} has no role '{role}'; it has {', '.join(roles)}")
    spec = roles[role]
    if ema and spec.get("ema_weights"):
        module = copy.deepcopy(module)
        module.load_state_dict(load_file(str(path / spec["ema_weights"])))
    elif spec.get("weights"):
        module.load_state_dict({_strip_wrapper(k): v for k, v in load_file(str(path / spec["weights"])).items()})
    else:
        raise OutputDirError(f"role '{role}' is frozen: its weights are not part of the run")
    return module.eval()


def _strip_wrapper(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def _module_spec(module: torch.nn.Module) -> dict:
    config = getattr(module, "config", None)
    if config is not None and hasattr(module, "from_config"):
        config = json.loads(json.dumps(dict(config), default=list))
    else:
        config = None
    return {"class": f"{type(module).__module__}.{type(module).__qualname__}", "config": config}


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


__all__ = [
    "checkpoint_name",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_role_weights",
    "load_trained_model",
    "save_checkpoint",
]
