"""``stepdistill eval``: evaluate one or more pipeline directories over a sweep of step counts,
guidance scales and (TCD) gammas, and write ``metrics.json``, ``metrics.md``, ``samples.png``
and ``plot.png``.

All input is checked (pipelines loaded, prompts read, real images listed, CLIP loaded) before
anything is generated, and the outputs are written only at the end, ``metrics.json`` last: a
run that fails leaves no partial ``metrics.json``. Everything except the latency columns is
deterministic for given arguments.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import StepdistillError
from .conditions import Conditions, label_conditions, load_prompts, prompt_conditions, unconditional
from .feature_spaces import get_feature_space
from .features import check_feature_network
from .generation import EvalPipeline, generate_images, load_eval_pipeline
from .latency import measure_latency
from .reference import list_images, reference_features
from .scoring import Reference, score_images

DEFAULT_STEPS = (1, 2, 4, 50)
CONDITIONING = {"class_conditional": "labels", "text_to_image": "prompts", "unconditional": "none"}  # benchmark kinds: labels
GRID_COLUMNS = 10


def _check_settings(steps, guidance_scales, gammas, batch_size, num_samples, latency_batch_size, latency_repeats, kid_subsets) -> None:
    if not steps or min(steps) < 1:
        raise StepdistillError(f"steps must be positive integers; got {list(steps)}")
    if not guidance_scales:
        raise StepdistillError("guidance_scales is empty")
    if any(g < 0 for g in gammas):
        raise StepdistillError(f"TCD gamma must be >= 0; got {list(gammas)}")
    if batch_size < 1 or latency_batch_size < 1 or latency_repeats < 1:
        raise StepdistillError("batch sizes and latency repeats must be at least 1")
    if kid_subsets < 1:
        raise StepdistillError(f"kid_subsets must be at least 1; got {kid_subsets}")
    if num_samples is not None and num_samples < 2:
        raise StepdistillError(f"num_samples must be at least 2; got {num_samples}")


def _unique_names(paths: Sequence[str], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(paths):
            raise StepdistillError(f"got {len(names)} names for {len(paths)} pipeline directories")
        if len(set(names)) != len(names):
            raise StepdistillError(f"model names must be distinct; got {list(names)}")
        return list(names)
    result = []
    for path in paths:
        base = os.path.basename(os.path.normpath(os.fspath(path))) or "model"
        name, index = base, 2
        while name in result:
            name, index = f"{base}_{index}", index + 1
        result.append(name)
    return result


def _conditions(models: list[EvalPipeline], prompts: list[str] | None, num_prompts, samples_per_prompt, class_labels, num_samples) -> Conditions:
    kinds = {CONDITIONING.get(m.kind, "labels") for m in models}
    if len(kinds) > 1:
        listing = ", ".join(f"{m.name}: {m.kind}" for m in models)
        raise StepdistillError(f"pipelines evaluated together must take the same conditions; got {listing}")
    benchmarks = {m.kind for m in models if m.benchmark is not None}
    if benchmarks and (len(benchmarks) > 1 or any(m.benchmark is None for m in models)):
        name = sorted(benchmarks)[0]
        raise StepdistillError(f"{name} pipelines are scored by the {name} benchmark: evaluate them apart from other pipelines")
    kind = kinds.pop()
    if kind == "prompts":
        if prompts is None:
            raise StepdistillError("text-to-image pipelines need a prompts file (--prompts)")
        if class_labels is not None:
            raise StepdistillError("class labels were given for a text-to-image pipeline")
        if num_prompts is not None:
            if num_prompts < 1:
                raise StepdistillError(f"num_prompts must be at least 1; got {num_prompts}")
            prompts = prompts[:num_prompts]
        return prompt_conditions(prompts, samples_per_prompt)
    if prompts is not None:
        raise StepdistillError(f"{models[0].path} does not take prompts ({models[0].kind}): drop --prompts")
    num_samples = 2000 if num_samples is None else num_samples
    if kind == "none":
        if class_labels is not None:
            raise StepdistillError(f"{models[0].path} is unconditional: drop --class-labels")
        return unconditional(num_samples)
    num_classes = min(int(m.benchmark.num_classes if m.benchmark is not None else m.pipe.num_classes) for m in models)
    if class_labels is None:
        return label_conditions(torch.arange(num_samples) % num_classes)  # class-balanced
    chosen = torch.as_tensor(list(class_labels), dtype=torch.long)
    if chosen.numel() == 0 or chosen.min() < 0 or chosen.max() >= num_classes:
        raise StepdistillError(f"class labels must lie in [0, {num_classes}); got {list(class_labels)}")
    return label_conditions(chosen[torch.arange(num_samples) % chosen.numel()])


def _feature_network(feature, inception_weights) -> tuple[nn.Module, str]:
    """A feature network and its display name: a module as given, or a registered feature space
    ("auto": Inception with weights, else random-conv, with a note that its FD is not FID)."""
    if isinstance(feature, nn.Module):
        check_feature_network(feature)
        return feature, type(feature).__name__
    if feature == "auto":
        feature = "inception" if inception_weights is not None else "random-conv"
        if feature == "random-conv":
            print("note: no Inception weights (--inception-weights): FD is measured in random-conv features (FD_rc, not FID)", file=sys.stderr)
    options = {} if inception_weights is None else {"inception_weights": inception_weights}
    return get_feature_space(feature, **options)


def _reference(models, feature, inception_weights, real_dir, cache_dir, batch_size) -> Reference:
    benchmark = models[0].benchmark
    if benchmark is not None:
        if real_dir is not None or feature not in ("auto", benchmark.name):
            raise StepdistillError(
                f"{benchmark.name} pipelines are scored like `bench {benchmark.name}` (against the benchmark's own reference): "
                "drop --real-dir / --feature"
            )
        return benchmark.reference()
    network, name = _feature_network(feature, inception_weights)
    if real_dir is None:
        return Reference(network, name, None, {"name": None})
    channels = {m.channels for m in models}
    if len(channels) > 1:
        raise StepdistillError(f"the pipelines make images with different channel counts: {sorted(channels)}")
    features, info = reference_features(real_dir, network, channels=channels.pop(), cache_dir=cache_dir, batch_size=batch_size)
    return Reference(network, name, features, {"name": os.fspath(real_dir), **info})


def _check_clip(clip_model, conditions: Conditions):
    if clip_model is None:
        return None
    if conditions.prompts is None:
        raise StepdistillError("CLIP score needs prompts: --clip-model applies to text-to-image pipelines")
    if isinstance(clip_model, (str, os.PathLike)):
        from .clip import load_local_clip

        return load_local_clip(clip_model)
    return clip_model


def _configurations(model: EvalPipeline, steps, guidance_scales, gammas) -> list[tuple[int, float | None, float | None]]:
    scales = list(guidance_scales) if model.uses_guidance else [None]
    model_gammas = list(gammas) if gammas and model.has_gamma else [None]
    return [(s, w, g) for s in steps for w in scales for g in model_gammas]


@dataclass(frozen=True)
class EvalOptions:
    """How :func:`run_evaluation` samples and scores: one typed object (``stepdistill eval`` fills it
    from its flags); every field is described in :func:`run_evaluation`."""

    names: Sequence[str] | None = None
    prompts_file: str | os.PathLike | None = None
    num_prompts: int | None = None
    samples_per_prompt: int = 4
    class_labels: Sequence[int] | None = None
    num_samples: int | None = None
    steps: Sequence[int] = DEFAULT_STEPS
    guidance_scales: Sequence[float] = (1.0,)
    gammas: Sequence[float] = ()
    seed: int = 0
    batch_size: int = 256
    real_dir: str | os.PathLike | None = None
    feature: str | nn.Module = "auto"
    inception_weights: str | os.PathLike | None = None
    reference_cache_dir: str | os.PathLike | None = None
    clip_model: Any = None  # a local CLIP directory, or a callable returning (model, processor)
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    latency_batch_size: int = 16
    latency_repeats: int = 3
    noise_floor: bool = True
    update_model_cards: bool = False
    command: str | None = None
    device: str | None = None
    progress: bool = True


def run_evaluation(
    pipeline_dirs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    options: EvalOptions | None = None,
    **fields: Any,
) -> dict:
    """Evaluate pipeline directories (teacher and students side by side); returns the metrics dict.
    ``options`` (:class:`EvalOptions`), with any of its fields given as keywords on top.

    Conditions: class labels (class-balanced over ``num_samples``, default 2000, or cycling
    through ``class_labels``), or the prompts of ``prompts_file`` (first ``num_prompts``), each
    generated with ``samples_per_prompt`` seeds. Pipelines a benchmark claims (digits) are scored
    exactly as that benchmark scores them; other pipelines against the features of ``real_dir`` in the
    ``feature`` space: a registered name (``feature_spaces()``: "random-conv", "inception",
    "digits", ...), any ``nn.Module``, or "auto" = Inception when ``inception_weights`` is
    given, else random-conv.
    ``noise_floor`` (benchmark pipelines): also report the benchmark's noise floor at this N.
    ``update_model_cards``: also write each model's rows into the model card (README.md) of its
    directory, where it has one -- never into a directory inside an installed package (those are
    listed under ``model_cards_left_alone``). Without it the input directories are not touched.
    """
    o = dataclasses.replace(options or EvalOptions(), **fields)
    clip_model = o.clip_model
    names, prompts_file, num_prompts, samples_per_prompt = o.names, o.prompts_file, o.num_prompts, o.samples_per_prompt
    class_labels, num_samples, steps, guidance_scales = o.class_labels, o.num_samples, o.steps, o.guidance_scales
    gammas, seed, batch_size, real_dir = o.gammas, o.seed, o.batch_size, o.real_dir
    feature, inception_weights, reference_cache_dir, kid_subsets = o.feature, o.inception_weights, o.reference_cache_dir, o.kid_subsets
    kid_subset_size, pr_k, latency_batch_size, latency_repeats = o.kid_subset_size, o.pr_k, o.latency_batch_size, o.latency_repeats
    noise_floor, update_model_cards, command, device = o.noise_floor, o.update_model_cards, o.command, o.device
    progress = o.progress
    from tqdm.auto import tqdm

    from .report import write_outputs

    began = time.perf_counter()
    if not pipeline_dirs:
        raise StepdistillError("no pipeline directory to evaluate")
    steps = tuple(int(s) for s in steps)
    guidance_scales = tuple(float(w) for w in guidance_scales)
    gammas = tuple(float(g) for g in gammas)
    _check_settings(steps, guidance_scales, gammas, batch_size, num_samples, latency_batch_size, latency_repeats, kid_subsets)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # Everything that can be wrong with the input is found here, before any sampling: the
    # cheap checks (files, folders) first, then the pipelines.
    prompts = load_prompts(prompts_file) if prompts_file is not None else None
    if real_dir is not None:
        list_images(real_dir)
    model_names = _unique_names([os.fspath(p) for p in pipeline_dirs], names)
    models = [load_eval_pipeline(p, name, device=device) for p, name in zip(pipeline_dirs, model_names)]
    conditions = _conditions(models, prompts, num_prompts, samples_per_prompt, class_labels, num_samples)
    clip = _check_clip(clip_model, conditions)
    reference = _reference(models, feature, inception_weights, real_dir, reference_cache_dir, batch_size)
    if reference.scorer is None:  # a benchmark's own scorer keeps its networks where it runs them (CPU)
        reference.feature.to(device)

    floor = None
    if models[0].benchmark is not None and noise_floor:
        floor = models[0].benchmark.noise_floor(len(conditions), seed=seed)

    rows, grid = [], []
    configurations = [(m, c) for m in models for c in _configurations(m, steps, guidance_scales, gammas)]
    bar = tqdm(configurations, desc="eval", unit="config", disable=not progress)
    latency_conditions = conditions.head(min(latency_batch_size, len(conditions)))
    for model, (num_steps, guidance, gamma) in bar:
        bar.set_postfix_str(f"{model.name} steps={num_steps} w={guidance} gamma={gamma}")
        images = generate_images(model, conditions, num_steps, guidance, gamma, seed=seed, batch_size=batch_size)
        scores = score_images(
            images, conditions, reference, clip=clip, kid_subsets=kid_subsets,
            kid_subset_size=kid_subset_size, pr_k=pr_k, seed=seed, batch_size=batch_size,
        )
        latency = measure_latency(
            lambda: generate_images(model, latency_conditions, num_steps, guidance, gamma, seed=seed,
                                    batch_size=len(latency_conditions)).shape[0],
            model.denoisers, device=device, repeats=latency_repeats,
        )
        rows.append({"model": model.name, "steps": num_steps, "guidance_scale": guidance, "gamma": gamma,
                     "num_samples": len(conditions), **scores, **latency})
        grid.append((f"{model.name} steps={num_steps} w={guidance} gamma={gamma}", images[:GRID_COLUMNS]))

    results = {
        "command": command,
        "pipelines": [
            {"name": m.name, "path": m.path, "kind": m.kind, "scheduler": m.scheduler_name, "tcd_gamma": m.has_gamma}
            for m in models
        ],
        "conditions": {
            "kind": conditions.kind,
            "num_samples": len(conditions),
            "num_conditions": int(torch.unique(conditions.groups).numel()),
            "prompts_file": None if prompts_file is None else os.fspath(prompts_file),
        },
        "feature": reference.feature_name,
        "reference": reference.info,
        "noise_floor": floor,
        "steps": list(steps),
        "guidance_scales": list(guidance_scales),
        "guidance_convention": "uncond + w * (cond - uncond); w = 1 is no guidance",
        "gammas": list(gammas),
        "seed": seed,
        "batch_size": batch_size,
        "pr_k": pr_k,
        "kid_subsets": kid_subsets,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "rows": rows,
        "wall_seconds": time.perf_counter() - began,
    }
    results["outputs"] = write_outputs(results, grid, Path(output_dir))
    if update_model_cards:
        results["model_cards"], results["model_cards_left_alone"] = _update_model_cards(models, rows, command, results)
    return results


def _update_model_cards(models: list[EvalPipeline], rows: list[dict], command: str | None, results: dict) -> tuple[list[str], list[str]]:
    """Put each model's rows into the metrics table of its README.md (exported directories only;
    never one inside an installed package). Returns (cards updated, why others were left alone)."""
    from ..model_card import CARD_NAME, inside_installed_package, portable_path, update_model_card_metrics

    updated, left_alone = [], []
    for model in models:
        if not os.path.isfile(os.path.join(model.path, CARD_NAME)):
            left_alone.append(f"{model.path}: no {CARD_NAME}")
            continue
        package = inside_installed_package(model.path)
        if package is not None:
            left_alone.append(f"{model.path}: inside the installed package at {package}")
            continue
        table = [{k: v for k, v in row.items() if k != "model"} for row in rows if row["model"] == model.name]
        reference = portable_path(results["reference"].get("name"))
        updated.append(str(update_model_card_metrics(model.path, table, command, reference=reference, feature=results["feature"])))
    return updated, left_alone
