"""The t2i benchmark: prompt accuracy, FD, precision / recall, per-prompt diversity and speed of a
text-to-image pipeline on the procedural captioned scenes of :mod:`stepdistill.t2i.data`.

For every (steps, guidance scale) it generates, from fixed seeds:

- **seen prompts**: ``eval_prompts("seen", P)`` (the captions of test-split images 0..P-1, the
  training distribution), each ``samples_per_prompt`` (S) times, ``P = ceil(N / S)``, N samples
  in all, seed-major (samples 0..P-1 are every prompt once, then every prompt's second seed, ...);
- **held-out prompts**: ``eval_prompts("heldout", ceil(M / S))`` the same way, M samples: the
  (colour, shape) pairs the training split never shows (composition).

and scores them with the shipped attribute classifier (:mod:`.classifier`):

- ``prompt_accuracy``: the fraction of seen-prompt samples whose classified attributes *all*
  match their prompt, and per attribute (``attribute_accuracy``); ``heldout_prompt_accuracy`` /
  ``heldout_attribute_accuracy`` the same on the held-out prompts;
- ``fd``: Fréchet distance of the seen-prompt samples' classifier penultimate features (feature
  space ``t2i``) against the reference, the features of the first 10,000 training-split images
  (made in memory, cached per process); ``precision`` / ``recall`` (k = 3) against the first N of
  those (equal set sizes);
- ``diversity``: mean pairwise feature distance among the S samples of each prompt (they differ
  only by seed), averaged over prompts: 0 for a model that ignores its noise;
- ``images_per_second``: seen-prompt generation, first batch excluded.

The noise floor is the same scoring of *real* images made for the same prompt list (each prompt's
scene rendered afresh, S times: what a perfect generator makes), mean ± std of the FD over
``NOISE_FLOOR_DRAWS`` draws; its accuracy is the classifier's ceiling and its diversity the real
one. Model FDs at that N are only meaningful above it.

Sample ``i`` of a configuration draws its noise from its own generator seeded with
``seed * 1_000_003 + i`` (held-out samples continue the index after the N seen ones), so samples
do not depend on the batch size and are the same noise for every step count and guidance scale.
Guidance: the pipeline's own ``__call__``, ``uncond + w * (cond - uncond)``; ``w = 1`` is no CFG.

:func:`ladder` is the sanity ladder of both metrics on real images (own captions, blur, a colour
shift, permuted colour channels, shuffled captions, collapse to one image per prompt).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_json, write_text
from ..errors import StepdistillError
from ..evaluation.latency import synchronize
from ..export import LORA_WEIGHT_NAME
from ..model_card import portable_path
from .data import ATTRIBUTES, SIZE, eval_prompts, parse_caption, render

DEFAULT_STEPS = (1, 2, 4, 10, 50)
DEFAULT_GUIDANCE_SCALES = (1.0, 4.0)
DEFAULT_NUM_SAMPLES = 2000
DEFAULT_HELDOUT_SAMPLES = 500
SAMPLES_PER_PROMPT = 4
REFERENCE_IMAGES = 10000
NOISE_FLOOR_DRAWS = 3
PR_K = 3
# registered teacher names -> folder under stepdistill/t2i/weights/ (shipped separately)
TEACHERS = {"t2i-sd": "sd", "t2i-flow": "flow"}
FEATURE_SPACE = "t2i attribute classifier penultimate features"
GUIDANCE_CONVENTION = "uncond + w * (cond - uncond); w = 1 is no guidance"


# --- pipelines --------------------------------------------------------------------------------


def teacher_dir(name: str) -> Path:
    """Where the shipped t2i teacher ``name`` (``t2i-sd`` / ``t2i-flow``) lives; it may not exist."""
    if name not in TEACHERS:
        raise StepdistillError(f"unknown t2i teacher {name!r}; known: {', '.join(TEACHERS)}")
    return Path(__file__).resolve().parent / "weights" / TEACHERS[name]


def resolve_pipeline_dir(path_or_name: str | os.PathLike) -> str:
    """A pipeline directory, or a registered teacher name (``t2i-sd``, ``t2i-flow``, or any name a
    plugin registers), -> the directory; a clear error when it is missing."""
    path = os.fspath(path_or_name)
    if os.path.exists(path):
        return path
    if path in TEACHERS:
        located = teacher_dir(path)
        if not (located / "model_index.json").is_file():
            raise StepdistillError(f"the t2i teacher {path!r} is not installed: no diffusers pipeline at {located}; "
                                   "pass a pipeline directory instead")
        return os.fspath(located)
    from ..teachers import resolve_teacher_path

    located = resolve_teacher_path(path)  # other registered names; raises when one is missing
    if not os.path.exists(located):
        raise StepdistillError(f"pipeline directory does not exist and is not a registered teacher name: {path} "
                               f"(t2i teachers: {', '.join(TEACHERS)})")
    return located


def load_t2i_pipeline(path_or_name: str | os.PathLike, device: str | torch.device = "cpu"):
    """A text-to-image diffusers pipeline from a directory or a registered teacher name, loaded with
    the stock ``DiffusionPipeline.from_pretrained(dir)`` (no remote code). A LoRA directory (a LoRA
    student's export: ``pytorch_lora_weights.safetensors``, ``scheduler/``, a model card naming its
    ``base_model``) is loaded the way its card's snippet does: the base pipeline, the directory's
    scheduler, ``pipe.load_lora_weights(dir)``."""
    import inspect

    from diffusers import DiffusionPipeline

    path = resolve_pipeline_dir(path_or_name)
    lora = os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)) and not os.path.isfile(os.path.join(path, "model_index.json"))
    if not lora and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise StepdistillError(f"{path} is not a diffusers pipeline directory (no model_index.json) nor a LoRA directory ({LORA_WEIGHT_NAME})")
    try:
        pipe = _load_lora_directory(path) if lora else DiffusionPipeline.from_pretrained(path)
    except StepdistillError:
        raise
    except Exception as exc:  # diffusers raises many types for broken directories
        raise StepdistillError(f"cannot load the pipeline in {path}: {exc}".splitlines()[0]) from exc
    if "prompt" not in inspect.signature(pipe.__call__).parameters:
        raise StepdistillError(f"{path} holds a {type(pipe).__name__}, not a text-to-image pipeline (its __call__ takes no prompt)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)



def _load_lora_directory(path: str):
    import diffusers

    from ..model_card import read_front_matter

    base = read_front_matter(path).get("base_model")
    if not base:
        raise StepdistillError(f"{path} holds a LoRA file but its model card names no base_model to load it onto")
    pipe = diffusers.DiffusionPipeline.from_pretrained(resolve_pipeline_dir(base))
    scheduler_dir = os.path.join(path, "scheduler")
    if os.path.isdir(scheduler_dir):
        with open(os.path.join(scheduler_dir, "scheduler_config.json")) as f:
            cls = getattr(diffusers, json.load(f)["_class_name"])
        pipe.scheduler = cls.from_pretrained(path, subfolder="scheduler")
    pipe.load_lora_weights(path)
    return pipe


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    first_index: int = 0,
) -> tuple[torch.Tensor, float | None]:
    """Images [N, 3, 32, 32] in [-1, 1] for ``prompts`` from the pipeline's own ``__call__``, and
    images/second (first batch excluded unless it is the only one).

    Sample ``i`` uses a generator seeded with ``seed * 1_000_003 + first_index + i``.
    """
    import inspect

    parameters = set(inspect.signature(pipe.__call__).parameters)
    device = pipe.device
    extra = {key: SIZE for key in ("height", "width") if key in parameters}
    images, timings = [], []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        generators = [torch.Generator(device).manual_seed(seed * 1_000_003 + first_index + i) for i in range(start, stop)]
        synchronize(device)
        began = time.perf_counter()
        out = pipe(prompt=list(prompts[start:stop]), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   generator=generators, output_type="pt", **extra).images
        synchronize(device)
        timings.append((stop - start, time.perf_counter() - began))
        batch = torch.as_tensor(out).float().cpu()
        if batch.dim() != 4 or tuple(batch.shape[1:]) != (3, SIZE, SIZE):
            raise StepdistillError(f"the t2i benchmark needs 3 x {SIZE} x {SIZE} images; {type(pipe).__name__} made {tuple(batch.shape[1:])}")
        images.append(batch * 2.0 - 1.0)
    timed = timings[1:] if len(timings) > 1 else timings
    seconds = sum(t for _, t in timed)
    speed = sum(n for n, _ in timed) / seconds if seconds > 0 else None
    return (torch.cat(images) if images else torch.zeros(0, 3, SIZE, SIZE)), speed


# --- scoring ----------------------------------------------------------------------------------


def prompt_set(kind: str, count: int, samples_per_prompt: int = SAMPLES_PER_PROMPT, seed: int = 0):
    """:class:`~stepdistill.evaluation.conditions.Conditions` of ``count`` samples: the first
    ``ceil(count / samples_per_prompt)`` prompts of ``kind`` (``seen`` / ``heldout``), seed-major."""
    from ..evaluation.conditions import prompt_conditions

    if count < 1:
        raise StepdistillError(f"need at least 1 sample; got {count}")
    prompts = eval_prompts(kind, math.ceil(count / samples_per_prompt), seed=seed)
    return prompt_conditions(prompts, samples_per_prompt).head(count)


def real_samples(prompts: list[str], seed: int = 1) -> torch.Tensor:
    """Real images for ``prompts`` ([N, 3, 32, 32] in [-1, 1]): each prompt's scene rendered afresh
    (image ``i`` from ``numpy.random.default_rng([seed, 1000, i])``), what a perfect generator makes."""
    arrays = [np.asarray(render(parse_caption(prompt), np.random.default_rng([seed, 1000, i]))) for i, prompt in enumerate(prompts)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@lru_cache(maxsize=2)
def reference_features(count: int = REFERENCE_IMAGES) -> torch.Tensor:
    """Classifier features (float64 [count, 128]) of training-split images 0..count-1 (seed 0)."""
    from ..evaluation.features import extract_features
    from .classifier import feature_module, real_images

    images, _ = real_images(count, "train")
    return extract_features(images, feature_module())


def _accuracy(predicted: dict[str, torch.Tensor], prompts: list[str]) -> dict:
    from .classifier import attribute_accuracy, scene_labels

    accuracy = attribute_accuracy(predicted, scene_labels([parse_caption(p) for p in prompts]))
    overall = accuracy.pop("all")
    return {"prompt_accuracy": overall, "attribute_accuracy": accuracy}


def prompt_accuracy(images: torch.Tensor, prompts: list[str]) -> dict:
    """``{"prompt_accuracy": the fraction with every attribute right, "attribute_accuracy":
    {attribute: fraction right}}`` of images [N, 3, 32, 32] in [-1, 1] for their prompts."""
    from .classifier import classify

    if images.shape[0] != len(prompts):
        raise StepdistillError(f"got {images.shape[0]} images for {len(prompts)} prompts")
    return _accuracy(classify(images), prompts)


def score_samples(images: torch.Tensor, prompts: list[str], groups: torch.Tensor | None = None,
                  reference_count: int = REFERENCE_IMAGES) -> dict:
    """Prompt accuracy (overall, per attribute), FD against the reference, precision / recall
    against its first N (equal set sizes, as Kynkäänniemi et al. use them; k = 3), and per-prompt
    diversity (``groups``: the prompt index of each sample; default: samples with the same prompt
    text). One classifier pass: the heads read the FD features."""
    from ..evaluation.distribution import fid_from_features, per_condition_diversity, precision_recall
    from ..evaluation.features import extract_features
    from .classifier import classify_features, feature_module

    if images.shape[0] != len(prompts):
        raise StepdistillError(f"got {images.shape[0]} images for {len(prompts)} prompts")
    if groups is None:
        from ..evaluation.conditions import prompt_groups

        groups = prompt_groups(prompts)
    reference = reference_features(reference_count)
    features = extract_features(images, feature_module())
    scores = _accuracy(classify_features(features), prompts)
    scores["fd"] = fid_from_features(reference, features)
    scores.update(precision_recall(reference[: len(features)], features, k=PR_K))
    scores["diversity"] = per_condition_diversity(features, groups)
    return scores


def noise_floor(conditions, draws: int = NOISE_FLOOR_DRAWS, reference_count: int = REFERENCE_IMAGES) -> dict:
    """The scores of real images made for ``conditions``' prompts (draws 1..``draws``): the first
    draw's scores, with ``fd`` the mean over draws, ``fd_std`` and ``fd_draws``."""
    rows = [score_samples(real_samples(conditions.prompts, seed=1 + k), conditions.prompts, conditions.groups, reference_count)
            for k in range(draws)]
    fds = [row["fd"] for row in rows]
    mean = sum(fds) / len(fds)
    std = (sum((v - mean) ** 2 for v in fds) / max(len(fds) - 1, 1)) ** 0.5
    return {**rows[0], "fd": mean, "fd_std": std, "fd_draws": fds, "num_samples": len(conditions)}


# --- the benchmark ----------------------------------------------------------------------------


def run_bench(
    path_or_name: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    steps: tuple[int, ...] = DEFAULT_STEPS,
    guidance_scales: tuple[float, ...] = DEFAULT_GUIDANCE_SCALES,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    heldout_samples: int = DEFAULT_HELDOUT_SAMPLES,
    samples_per_prompt: int = SAMPLES_PER_PROMPT,
    batch_size: int = 64,
    seed: int = 0,
    device: str | None = None,
    save_grids: bool = True,
    progress: bool = True,
    reference_count: int = REFERENCE_IMAGES,
) -> dict:
    """Benchmark a text-to-image pipeline directory or registered teacher name (module docstring).

    Writes ``bench.json``, ``bench.md`` and (``save_grids``) a sample grid per configuration into
    ``output_dir`` when given; returns the results dict (``rows``: one per steps x guidance).
    """
    from tqdm.auto import tqdm

    began = time.perf_counter()
    if num_samples < PR_K + 1:
        raise StepdistillError(f"num_samples must be at least {PR_K + 1} (FD, precision / recall); got {num_samples}")
    if heldout_samples < 0 or batch_size < 1 or samples_per_prompt < 1:
        raise StepdistillError(f"need heldout_samples >= 0, batch_size >= 1, samples_per_prompt >= 1; "
                               f"got {heldout_samples}, {batch_size}, {samples_per_prompt}")
    steps = tuple(int(s) for s in steps)
    guidance_scales = tuple(float(w) for w in guidance_scales)
    if not steps or min(steps) < 1:
        raise StepdistillError(f"steps must be positive integers; got {list(steps)}")
    if not guidance_scales:
        raise StepdistillError("guidance_scales is empty")
    pipeline_dir = resolve_pipeline_dir(path_or_name)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_t2i_pipeline(pipeline_dir, device=device)
    out_dir = Path(output_dir) if output_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    seen = prompt_set("seen", num_samples, samples_per_prompt)
    heldout = prompt_set("heldout", heldout_samples, samples_per_prompt) if heldout_samples else None
    floor = noise_floor(seen, reference_count=reference_count)

    rows = []
    configs = [(s, w) for s in steps for w in guidance_scales]
    bar = tqdm(configs, desc="t2i bench", unit="config", disable=not progress)
    for num_steps, guidance in bar:
        bar.set_postfix_str(f"steps={num_steps} w={guidance:g}")
        images, speed = generate(pipe, seen.prompts, num_steps, guidance, batch_size=batch_size, seed=seed)
        row = {"steps": num_steps, "guidance_scale": guidance,
               **score_samples(images, seen.prompts, seen.groups, reference_count)}
        row["heldout_prompt_accuracy"] = row["heldout_attribute_accuracy"] = None
        if heldout is not None:
            held, _ = generate(pipe, heldout.prompts, num_steps, guidance, batch_size=batch_size, seed=seed, first_index=num_samples)
            held_scores = prompt_accuracy(held, heldout.prompts)
            row["heldout_prompt_accuracy"] = held_scores["prompt_accuracy"]
            row["heldout_attribute_accuracy"] = held_scores["attribute_accuracy"]
        row["images_per_second"] = speed
        rows.append(row)
        if out_dir is not None and save_grids:
            from ..images import save_image_grid

            shown = min(64, len(images))
            save_image_grid(images[:shown], out_dir / f"samples_steps{num_steps}_w{guidance:g}.png", nrow=8)

    results = {
        "benchmark": "t2i",
        "pipeline": pipeline_dir,
        "n": num_samples,
        "heldout_n": heldout_samples,
        "samples_per_prompt": samples_per_prompt,
        "num_prompts": int(seen.groups.max()) + 1,
        "batch_size": batch_size,
        "seed": seed,
        "reference": f"training-split images 0..{reference_count - 1} (seed 0)",
        "feature_space": f"{FEATURE_SPACE} ({reference_features(reference_count).shape[1]})",
        "guidance_convention": GUIDANCE_CONVENTION,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "noise_floor": floor,
        "rows": rows,
        "wall_seconds": time.perf_counter() - began,
    }
    if out_dir is not None:
        write_json(out_dir / "bench.json", results)
        write_text(out_dir / "bench.md", _markdown_report(results))
    return results


def json_object(results: dict) -> dict:
    """What ``stepdistill bench t2i --json`` prints: the results with their ``rows``; with exactly
    one row (one steps x guidance), that row's fields at the top level too."""
    obj = dict(results)
    if len(results["rows"]) == 1:
        obj.update(results["rows"][0])
    return obj


def _number(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


_COLUMNS = ("| steps | guidance | prompt acc ↑ | held-out acc ↑ | "
            + " | ".join(ATTRIBUTES) + " | FD ↓ | precision | recall | diversity | images/s |")


def _cells(row: dict) -> str:
    return (
        f"| {row['steps']} | {row['guidance_scale']:g} | {_number(row['prompt_accuracy'], 3)} | {_number(row['heldout_prompt_accuracy'], 3)} | "
        + " | ".join(_number(row["attribute_accuracy"][name], 3) for name in ATTRIBUTES)
        + f" | {_number(row['fd'], 2)} | {_number(row['precision'], 3)} | {_number(row['recall'], 3)} "
        f"| {_number(row['diversity'], 2)} | {_number(row['images_per_second'], 1)} |"
    )


def _floor_cells(floor: dict) -> str:
    return (
        f"| – | {floor['prompt_accuracy']:.3f} | – | "
        + " | ".join(f"{floor['attribute_accuracy'][name]:.3f}" for name in ATTRIBUTES)
        + f" | {floor['fd']:.2f} ± {floor['fd_std']:.2f} | {floor['precision']:.3f} | {floor['recall']:.3f} | {_number(floor['diversity'], 2)} | – |"
    )


def format_table(results: dict) -> str:
    """The results of :func:`run_bench` as a markdown table (one row per steps x guidance, per-
    attribute columns are seen-prompt accuracies), the real-image noise floor last."""
    lines = [_COLUMNS, "|" + "---:|" * (_COLUMNS.count("|") - 1)]
    lines += [_cells(row) for row in results["rows"]]
    lines.append("| real images (noise floor) " + _floor_cells(results["noise_floor"]))
    return "\n".join(lines)


def format_comparison(results: dict[str, dict]) -> str:
    """Several :func:`run_bench` results (same prompts, noise and N) in one table with a model
    column, the noise floor once at the end; where each came from below the table."""
    lines = ["| model " + _COLUMNS, "|---" + "|---:" * (_COLUMNS.count("|") - 1) + "|"]
    for name, result in results.items():
        lines += [f"| {name} " + _cells(row) for row in result["rows"]]
    first = next(iter(results.values()))
    lines.append("| real images (noise floor) | – " + _floor_cells(first["noise_floor"]))
    lines.append("")
    lines.append(f"N = {first['n']} seen-prompt samples per row ({first['num_prompts']} prompts x {first['samples_per_prompt']} seeds, "
                 f"seed {first['seed']}), {first['heldout_n']} held-out; " + "; ".join(f"{name}: {portable_path(result['pipeline'])}" for name, result in results.items()))
    return "\n".join(lines)


def _markdown_report(results: dict) -> str:
    return (
        f"# t2i benchmark: `{results['pipeline']}`\n\n"
        f"N = {results['n']} seen-prompt samples per row ({results['num_prompts']} prompts x {results['samples_per_prompt']} seeds, "
        f"seed {results['seed']}), {results['heldout_n']} held-out-prompt samples. FD, precision and recall against "
        f"{results['reference']} in the {results['feature_space']}; prompt accuracy: every attribute the shipped "
        f"classifier reads matches the prompt. Noise floor: real images for the same prompts, FD mean ± std of "
        f"{len(results['noise_floor']['fd_draws'])} draws. images/s: batch {results['batch_size']} on {results['device']} "
        f"({results['torch_threads']} threads), first batch excluded. Guidance: {results['guidance_convention']}.\n\n"
        f"{format_table(results)}\n\n"
        f"Wall time: {results['wall_seconds']:.0f} s.\n"
    )


# --- the sanity ladder ------------------------------------------------------------------------

LADDER_BLUR_RADII = (0.5, 1.0)


def ladder(num_samples: int = 1000, samples_per_prompt: int = SAMPLES_PER_PROMPT, seed: int = 0,
           blur_radii: tuple[float, ...] = LADDER_BLUR_RADII, reference_count: int = REFERENCE_IMAGES,
           vae: str | os.PathLike | None = None) -> list[dict]:
    """Both metrics on real images made for the seen prompts (the noise floor's first draw), as they
    are and under damage a generator can do. Rows ``{"label", "prompt_accuracy",
    "attribute_accuracy", "fd", "precision", "recall", "diversity"}``, in this order:

    - real images with their own captions: FD = the noise floor, accuracy = the classifier's ceiling;
    - Gaussian blur (``blur_radii``): FD grows;
    - a colour shift (red channel + 0.1) and the colour channels permuted (red -> green -> blue):
      the permutation maps the colour distribution onto itself, so FD hardly moves while colour
      accuracy collapses (why both metrics are needed);
    - shuffled captions (the same images, captions permuted): FD unchanged, accuracy collapses;
    - collapse: each prompt's samples replaced by its first: diversity 0, recall falls;
    - with ``vae`` (a pipeline directory or teacher name): the real images encoded and decoded by
      its VAE (posterior mean): the best a latent generator on that VAE can score.
    """
    from ..evaluation.ladder import blur, shift_colour

    conditions = prompt_set("seen", num_samples, samples_per_prompt, seed=seed)
    prompts, groups = conditions.prompts, conditions.groups
    real = real_samples(prompts, seed=1)
    shuffled = [prompts[int(i)] for i in torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))]
    first = {}
    for i, g in enumerate(groups.tolist()):
        first.setdefault(g, i)
    collapsed = real[torch.tensor([first[g] for g in groups.tolist()])]
    rungs = [("real images, own captions", real, prompts)]
    rungs += [(f"Gaussian blur radius {r:g}", blur(real, r), prompts) for r in blur_radii]
    rungs += [("red channel + 0.1", shift_colour(real, 0.1), prompts),
              ("colour channels permuted (R->G->B)", real[:, [2, 0, 1]], prompts),
              ("shuffled captions", real, shuffled),
              ("collapsed: one image per prompt", collapsed, prompts)]
    if vae is not None:
        rungs.append((f"through the VAE of {os.fspath(vae)}", vae_round_trip(real, vae), prompts))
    rows = []
    for label, images, captions in rungs:
        rows.append({"label": label, "num_samples": len(captions), **score_samples(images, captions, groups, reference_count)})
    return rows


@torch.no_grad()
def vae_round_trip(images: torch.Tensor, pipeline: str | os.PathLike, batch_size: int = 256) -> torch.Tensor:
    """``images`` ([-1, 1]) encoded to the posterior mean and decoded by the VAE of ``pipeline``."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.path.join(resolve_pipeline_dir(pipeline), "vae")).eval()
    out = [vae.decode(vae.encode(images[i:i + batch_size]).latent_dist.mode()).sample for i in range(0, len(images), batch_size)]
    return torch.cat(out).clamp(-1, 1)


def format_ladder(rows: list[dict]) -> str:
    """The ladder as a markdown table."""
    header = "| rung | prompt acc | " + " | ".join(ATTRIBUTES) + " | FD | precision | recall | diversity |"
    lines = [header, "|---|" + "---:|" * (header.count("|") - 2)]
    for row in rows:
        lines.append(f"| {row['label']} | {row['prompt_accuracy']:.3f} | "
                     + " | ".join(f"{row['attribute_accuracy'][name]:.3f}" for name in ATTRIBUTES)
                     + f" | {row['fd']:.2f} | {row['precision']:.3f} | {row['recall']:.3f} | {_number(row['diversity'], 2)} |")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_GUIDANCE_SCALES", "DEFAULT_STEPS", "TEACHERS", "format_ladder", "format_table", "generate", "json_object", "ladder",
    "load_t2i_pipeline", "noise_floor", "prompt_accuracy", "prompt_set", "real_samples", "reference_features",
    "resolve_pipeline_dir", "run_bench", "score_samples", "teacher_dir", "vae_round_trip",
]
