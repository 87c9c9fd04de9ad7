"""The digits reference benchmark: FD, class accuracy and speed of a class-conditional pipeline.

For every (steps, guidance scale) it generates ``num_samples`` class-balanced samples from fixed
noise and scores them with :func:`evaluate_samples` (FD against all 1,797 real digits in the
digits classifier's features, and the classifier's accuracy on the requested labels). The noise
floor is the FD of ``num_samples`` real digits drawn with replacement against all real digits
(mean of a few draws): what a perfect generator scores at the same sample size.

Guidance convention: ``uncond + w * (cond - uncond)``; ``w = 1`` means no guidance.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from ..atomic import write_json, write_text
from ..errors import StepdistillError
from ..evaluation.latency import synchronize
from ..images import save_image_grid
from ..metrics import frechet_distance, noise_floor
from .classifier import feature_module, load_classifier, predict
from .data import IMAGE_SIZE, NUM_CLASSES, load_split

DEFAULT_STEPS = (1, 2, 4, 10, 50)
DEFAULT_GUIDANCE_SCALES = (1.0, 2.0)
NOISE_FLOOR_DRAWS = 5


def default_teacher_dir() -> Path:
    """Where the shipped digits teacher lives (resolved when asked, it may not exist yet)."""
    return Path(__file__).resolve().parent / "weights" / "teacher"


def evaluate_samples(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Score digits samples: ``{"fd": ..., "accuracy": ...}``.

    ``images``: [N, 1, 8, 8] in [-1, 1]; ``labels``: the N classes that were asked for.
    FD is against all real digits, in the shipped classifier's penultimate features.
    """
    expected = (1, IMAGE_SIZE, IMAGE_SIZE)
    if not torch.is_tensor(images) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise StepdistillError(f"digits samples must have shape [N, 1, 8, 8]; got {shape}")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    if labels.shape[0] != images.shape[0]:
        raise StepdistillError(f"got {images.shape[0]} samples but {labels.shape[0]} labels")
    images = images.detach().float().cpu()
    real = load_split("all").images
    fd = frechet_distance(real, images, feature_module())
    accuracy = float((predict(images, classifier=load_classifier()) == labels).float().mean())
    return {"fd": fd, "accuracy": accuracy}


def balanced_labels(num_samples: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ...: class-balanced labels (exactly when num_samples % 10 == 0)."""
    return torch.arange(num_samples) % num_classes


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def load_pipeline(pipeline_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """A class-conditional digits pipeline directory, loaded with diffusers (remote code allowed).
    A directory that also holds a LoRA file (``pytorch_lora_weights.safetensors``: adapter guidance
    distillation) is loaded with its adapters on (``pipe.load_lora_weights(dir)``)."""
    from diffusers import DiffusionPipeline

    path = os.fspath(pipeline_dir)
    if not os.path.exists(path):
        raise StepdistillError(f"pipeline directory does not exist: {path}")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise StepdistillError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    try:
        pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    except Exception as exc:  # diffusers raises many types for broken directories
        raise StepdistillError(f"cannot load the pipeline in {path}: {exc}".splitlines()[0]) from exc
    unet = getattr(pipe, "unet", None)
    config = getattr(unet, "config", None)
    size = getattr(config, "sample_size", None)
    if (
        config is None
        or getattr(config, "num_class_embeds", None) != NUM_CLASSES + 1
        or getattr(config, "in_channels", None) != 1
        or size not in (IMAGE_SIZE, (IMAGE_SIZE, IMAGE_SIZE), [IMAGE_SIZE, IMAGE_SIZE])
    ):
        raise StepdistillError(
            f"{path} is not a digits pipeline: need a class-conditional UNet with 1 channel, "
            f"8x8 samples and {NUM_CLASSES + 1} class embeddings (10 digits + null)"
        )
    if os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
        pipe.load_lora_weights(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)



@torch.no_grad()
def generate_samples(
    pipe,
    labels: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
    eta: float | None = None,
) -> tuple[torch.Tensor, float | None]:
    """Samples [N, 1, 8, 8] in [-1, 1] for ``labels``, and images/second.

    ``eta`` goes to the scheduler's ``step`` where it takes one (DDIM's eta, TCD's gamma);
    ``None`` keeps the pipeline's default.

    The initial noise depends only on ``seed`` and N (not on the batch size), so every
    configuration starts from the same noise. Speed excludes the first batch (warm-up); with a
    single batch it is that batch's speed.
    """
    device = pipe.device
    num_samples = labels.shape[0]
    noise = torch.randn((num_samples, 1, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(seed))
    extra = {} if eta is None else {"eta": eta}
    images, timings = [], []
    for batch_index, start in enumerate(range(0, num_samples, batch_size)):
        stop = min(start + batch_size, num_samples)
        step_generator = torch.Generator(device).manual_seed(seed * 100_003 + batch_index + 1)  # stochastic schedulers
        synchronize(device)
        began = time.perf_counter()
        out = pipe(
            class_labels=labels[start:stop].tolist(),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=step_generator,
            latents=noise[start:stop].to(device),
            output_type="pt",
            **extra,
        ).images
        synchronize(device)
        timings.append((stop - start, time.perf_counter() - began))
        images.append(out.float().cpu() * 2.0 - 1.0)
    timed = timings[1:] if len(timings) > 1 else timings
    seconds = sum(t for _, t in timed)
    speed = sum(n for n, _ in timed) / seconds if seconds > 0 else None
    return torch.cat(images), speed


def run_bench(
    pipeline_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    num_samples: int = 2000,
    steps: tuple[int, ...] = DEFAULT_STEPS,
    guidance_scales: tuple[float, ...] = DEFAULT_GUIDANCE_SCALES,
    batch_size: int = 256,
    seed: int = 0,
    device: str | None = None,
    save_grids: bool = True,
    progress: bool = True,
) -> dict:
    """Benchmark a digits pipeline directory (default: the shipped teacher).

    Writes ``bench.json``, ``bench.md`` and (``save_grids``) one 10x10 sample grid per
    configuration into ``output_dir`` when given; returns the results dict.
    """
    from tqdm.auto import tqdm

    began = time.perf_counter()
    if num_samples < 2:
        raise StepdistillError(f"num_samples must be at least 2; got {num_samples}")
    if batch_size < 1:
        raise StepdistillError(f"batch_size must be at least 1; got {batch_size}")
    steps = tuple(int(s) for s in steps)
    guidance_scales = tuple(float(w) for w in guidance_scales)
    if not steps or min(steps) < 1:
        raise StepdistillError(f"steps must be positive integers; got {list(steps)}")
    if not guidance_scales:
        raise StepdistillError("guidance_scales is empty")
    if pipeline_dir is None:
        pipeline_dir = default_teacher_dir()
        if not pipeline_dir.exists():
            raise StepdistillError(f"the digits teacher is not shipped at {pipeline_dir}; pass a pipeline directory")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_pipeline(pipeline_dir, device=device)
    out_dir = Path(output_dir) if output_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    labels = balanced_labels(num_samples)
    real = load_split("all").images
    floor = noise_floor(real, feature_module(), num_samples=num_samples, draws=NOISE_FLOOR_DRAWS, seed=seed)

    rows = []
    configs = [(s, w) for s in steps for w in guidance_scales]
    bar = tqdm(configs, desc="digits bench", unit="config", disable=not progress)
    for num_steps, guidance in bar:
        bar.set_postfix_str(f"steps={num_steps} w={guidance:g}")
        images, speed = generate_samples(pipe, labels, num_steps, guidance, batch_size=batch_size, seed=seed)
        scores = evaluate_samples(images, labels)
        rows.append({"steps": num_steps, "guidance_scale": guidance, **scores, "images_per_second": speed})
        if out_dir is not None and save_grids:
            save_image_grid(images[:100], out_dir / f"samples_steps{num_steps}_w{guidance:g}.png", nrow=10)

    results = {
        "pipeline_dir": os.fspath(pipeline_dir),
        "num_samples": num_samples,
        "batch_size": batch_size,
        "seed": seed,
        "reference": f"all {len(real)} real digits",
        "guidance_convention": "uncond + w * (cond - uncond); w = 1 is no guidance",
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


def _format_number(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(results: dict) -> str:
    """The results of :func:`run_bench` as a markdown table (one row per steps x guidance)."""
    floor = results["noise_floor"]
    lines = [
        "| steps | guidance | FD ↓ | class accuracy ↑ | images/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['steps']} | {row['guidance_scale']:g} | {_format_number(row['fd'], 2)} "
            f"| {_format_number(row['accuracy'], 3)} | {_format_number(row['images_per_second'], 0)} |"
        )
    lines.append(f"| real digits (noise floor) | – | {floor['fd']:.2f} ± {floor['fd_std']:.2f} | – | – |")
    return "\n".join(lines)


def format_comparison(results: dict[str, dict]) -> str:
    """Several :func:`run_bench` results (same N, same noise) in one table with a model column,
    the noise floor once at the end; where each came from below the table."""
    lines = [
        "| model | steps | guidance | FD ↓ | class accuracy ↑ | images/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        for row in result["rows"]:
            lines.append(
                f"| {name} | {row['steps']} | {row['guidance_scale']:g} | {_format_number(row['fd'], 2)} "
                f"| {_format_number(row['accuracy'], 3)} | {_format_number(row['images_per_second'], 0)} |"
            )
    first = next(iter(results.values()))
    floor = first["noise_floor"]
    lines.append(f"| real digits (noise floor) | – | – | {floor['fd']:.2f} ± {floor['fd_std']:.2f} | – | – |")
    lines.append("")
    lines.append(f"N = {first['num_samples']} class-balanced samples per row (seed {first['seed']}); "
                 + "; ".join(f"{name}: {result['pipeline_dir']}" for name, result in results.items()))
    return "\n".join(lines)


def _markdown_report(results: dict) -> str:
    return (
        f"# Digits benchmark: `{results['pipeline_dir']}`\n\n"
        f"{results['num_samples']} class-balanced samples per row (seed {results['seed']}), "
        f"FD against {results['reference']} in the digits classifier's features; "
        f"noise floor: {results['noise_floor']['num_samples']} real digits drawn with replacement, "
        f"mean ± std of {len(results['noise_floor']['draws'])} draws. "
        f"images/s: batch {results['batch_size']} on {results['device']} "
        f"({results['torch_threads']} threads), first batch excluded. "
        f"Guidance: {results['guidance_convention']}.\n\n"
        f"{format_table(results)}\n\n"
        f"Wall time: {results['wall_seconds']:.0f} s.\n"
    )
