"""Exponential moving average of a module's weights, kept as a module of its own.

The average is a real ``nn.Module`` (a frozen deep copy), so a method can run it -- as the
EMA target of consistency distillation, or to draw evaluation samples -- and export it as is.
Parameters that do not require grad when the EMA is made (the frozen base under a LoRA) never
change, so the copy shares them with the module instead of duplicating them: the EMA of a
LoRA role costs its adapters, not a second base network.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = d * ema + (1 - d) * weights`` after each update, ``d = min(decay, (1+n)/(10+n))``.

    Floating-point parameters AND buffers are averaged; integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1); got {decay}")
        self.decay = decay
        self.num_updates = 0
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}  # shared, not copied
        self.module = copy.deepcopy(model, memo=frozen).eval().requires_grad_(False)

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.data_ptr() == value.data_ptr():  # a shared frozen parameter
                continue
            if target.is_floating_point():
                target.lerp_(value.detach().to(target.dtype), 1.0 - d)
            else:
                target.copy_(value)
        self.num_updates += 1

    def to(self, *args, **kwargs) -> "EMA":
        self.module.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.module.load_state_dict(state)
        self.num_updates = int(num_updates)


__all__ = ["EMA"]
