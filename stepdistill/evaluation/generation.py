"""Loading any diffusers pipeline directory for evaluation, and generating from fixed seeds.

Kinds of pipeline:

- a benchmark's own (``digits``): a pipeline a registered benchmark claims
  (:func:`register_pipeline_benchmark`, e.g. our class-conditional pipeline in the digits
  format) is loaded and sampled by that benchmark's functions, so ``eval`` and the benchmark
  produce the same samples and the same numbers;
- ``class_conditional``: any other pipeline called with ``class_labels`` (ours, DiT-like);
- ``text_to_image``: any pipeline called with ``prompt`` (Stable Diffusion and friends);
- ``unconditional``: stock DDPM / DDIM pipelines.

Outside a benchmark's kind, sample ``i`` draws its noise from its own generator seeded with
``seed * 1_000_003 + i``: a sample's noise depends on the seed and its index only, not on the batch
size, and is the same for every step count, guidance scale and model.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass

import torch

from ..errors import StepdistillError
from .conditions import Conditions


PIPELINE_BENCHMARKS: dict[str, object] = {}


def register_pipeline_benchmark(benchmark) -> None:
    """A benchmark that evaluates its own pipelines: an object with ``name``, ``num_classes``,
    ``load(path, device) -> pipe | None`` (None: not one of its pipelines), ``generate(pipe,
    labels, num_inference_steps, guidance_scale, batch_size, seed, eta) -> images``,
    ``reference() -> Reference`` and ``noise_floor(num_samples, seed) -> dict``."""
    PIPELINE_BENCHMARKS[benchmark.name] = benchmark


def _pipeline_benchmarks() -> list:
    from ..plugins import load_plugins

    load_plugins()
    return list(PIPELINE_BENCHMARKS.values())


@dataclass
class EvalPipeline:
    path: str
    name: str
    pipe: object
    kind: str
    benchmark: object | None = None  # the benchmark that claimed this pipeline

    @property
    def denoiser(self):
        """The network whose forward passes count as NFE (UNet or transformer)."""
        return getattr(self.pipe, "unet", None) or getattr(self.pipe, "transformer", None)

    @property
    def denoisers(self) -> list:
        """Every denoising network the pipeline calls (a hybrid pipeline: the student and the teacher)."""
        return [m for m in (getattr(self.pipe, name, None) for name in ("unet", "transformer", "teacher_unet")) if m is not None]

    @property
    def has_gamma(self) -> bool:
        """TCD's gamma (passed to the pipeline as ``eta``) exists only for TCDScheduler."""
        return type(getattr(self.pipe, "scheduler", None)).__name__ == "TCDScheduler"

    @property
    def uses_guidance(self) -> bool:
        return self.kind != "unconditional"

    @property
    def channels(self) -> int:
        vae = getattr(self.pipe, "vae", None)
        if vae is not None:
            return int(vae.config.out_channels)
        return int(self.denoiser.config.in_channels)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def scheduler_name(self) -> str:
        return type(getattr(self.pipe, "scheduler", None)).__name__


def _call_parameters(pipe) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)


def load_eval_pipeline(path: str | os.PathLike, name: str | None = None, device: str | torch.device = "cpu") -> EvalPipeline:
    """Load a diffusers pipeline directory for evaluation (one-line errors for bad directories)."""
    from diffusers import DiffusionPipeline

    path = os.fspath(path)
    name = name or os.path.basename(os.path.normpath(path))
    if not os.path.isdir(path):
        raise StepdistillError(f"pipeline directory does not exist: {path}")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise StepdistillError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    try:
        with open(index) as f:
            class_name = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise StepdistillError(f"cannot read {index}: {exc}".splitlines()[0]) from None
    if isinstance(class_name, (list, tuple)):
        class_name = class_name[-1]
    for benchmark in _pipeline_benchmarks():
        pipe = benchmark.load(path, device=device)
        if pipe is not None:
            return EvalPipeline(path, name, pipe, benchmark.name, benchmark)
    try:
        pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    except Exception as exc:  # diffusers raises many types for broken directories
        raise StepdistillError(f"cannot load the pipeline in {path}: {exc}".splitlines()[0]) from None
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    parameters = _call_parameters(pipe)
    if "class_labels" in parameters:
        kind = "class_conditional"
    elif "prompt" in parameters:
        kind = "text_to_image"
    elif "batch_size" in parameters:
        kind = "unconditional"
    else:
        raise StepdistillError(f"{path}: cannot tell how to call {type(pipe).__name__} (no class_labels, prompt or batch_size argument)")
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is None:
        raise StepdistillError(f"{path}: {type(pipe).__name__} has neither a unet nor a transformer to evaluate")
    return EvalPipeline(path, name, pipe, kind)


@torch.no_grad()
def generate_images(
    model: EvalPipeline,
    conditions: Conditions,
    num_inference_steps: int,
    guidance_scale: float | None = 1.0,
    gamma: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1], one per condition, from fixed seeds."""
    if model.benchmark is not None:
        if conditions.labels is None:
            raise StepdistillError(f"{model.path} is class-conditional: evaluate it with class labels, not prompts")
        return model.benchmark.generate(model.pipe, conditions.labels, num_inference_steps, guidance_scale,
                                        batch_size=batch_size, seed=seed, eta=gamma)

    parameters = _call_parameters(model.pipe)
    images = []
    for start in range(0, len(conditions), batch_size):
        stop = min(start + batch_size, len(conditions))
        generators = [torch.Generator(model.device).manual_seed(seed * 1_000_003 + i) for i in range(start, stop)]
        kwargs = {"num_inference_steps": num_inference_steps, "generator": generators, "output_type": "np"}
        if model.kind == "class_conditional":
            if conditions.labels is None:
                raise StepdistillError(f"{model.path} is class-conditional: evaluate it with class labels, not prompts")
            kwargs["class_labels"] = conditions.labels[start:stop].tolist()
        elif model.kind == "text_to_image":
            if conditions.prompts is None:
                raise StepdistillError(f"{model.path} is a text-to-image pipeline: pass a prompts file")
            kwargs["prompt"] = conditions.prompts[start:stop]
        else:
            kwargs["batch_size"] = stop - start
        if model.uses_guidance and guidance_scale is not None and "guidance_scale" in parameters:
            kwargs["guidance_scale"] = guidance_scale
        if gamma is not None:
            kwargs["eta"] = gamma
        out = model.pipe(**kwargs).images
        batch = torch.as_tensor(out).float()
        images.append(batch.permute(0, 3, 1, 2).cpu() * 2.0 - 1.0)
    return torch.cat(images)
