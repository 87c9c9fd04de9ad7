# A diffusers UNet2DModel that also takes the guidance scale as an input (stepdistill).
#
# This file is self-contained: exported pipeline directories carry a copy of it in `unet/`,
# and diffusers loads it as a custom component with
#   diffusers.DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)
# without stepdistill installed.
#
# It is UNet2DModel plus what diffusers' UNet2DConditionModel calls `time_cond_proj_dim`: the
# time embedding MLP gets `cond_proj`, a bias-free linear map of a guidance embedding added to
# its input (TimestepEmbedding's own `condition` argument), so
#   forward(sample, timestep, class_labels, timestep_cond=embedding_of(w - 1))
# conditions on w exactly as latent consistency models do in SD/SDXL. `cond_proj` starts at
# zero, so a copy of a UNet2DModel with its weights starts as that model.

from __future__ import annotations

import inspect
from typing import Optional, Union

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config


class GuidanceUNet2DModel(UNet2DModel):
    """``UNet2DModel`` with a w-embedding input (``time_cond_proj_dim``, ``timestep_cond``)."""

    ignore_for_config = ["unet_kwargs"]

    @register_to_config
    def __init__(self, time_cond_proj_dim: int = 256, **unet_kwargs):
        super().__init__(**unet_kwargs)
        linear = self.time_embedding.linear_1
        self.time_embedding.cond_proj = torch.nn.Linear(time_cond_proj_dim, linear.in_features, bias=False)
        torch.nn.init.zeros_(self.time_embedding.cond_proj.weight)

    @staticmethod
    def _get_init_keys(input_class):
        # the config holds UNet2DModel's arguments too: from_config must hand them on
        keys = set(inspect.signature(UNet2DModel.__init__).parameters)
        return keys | {"time_cond_proj_dim"}

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        class_labels: Optional[torch.Tensor] = None,
        timestep_cond: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """UNet2DModel's forward; ``timestep_cond`` [batch, time_cond_proj_dim] goes to the time
        embedding's ``condition`` (a forward pre-hook for the duration of this call)."""
        if timestep_cond is None:
            return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)

        def add_condition(module, args, kwargs):
            return args, {**kwargs, "condition": timestep_cond.to(args[0].dtype)}

        handle = self.time_embedding.register_forward_pre_hook(add_condition, with_kwargs=True)
        try:
            return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)
        finally:
            handle.remove()
