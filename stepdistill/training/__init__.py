"""The shared trainer and the methods it runs (see :mod:`stepdistill.training.trainer`)."""

from .checkpoint import latest_checkpoint, list_checkpoints, load_trained_model
from .ema import EMA
from .trainer import Role, StepContext, Trainer, TrainingMethod

__all__ = [
    "EMA",
    "Role",
    "StepContext",
    "Trainer",
    "TrainingMethod",
    "latest_checkpoint",
    "list_checkpoints",
    "load_trained_model",
]
