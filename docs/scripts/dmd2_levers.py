"""DMD2's memory levers measured on one mid-size config, in one run (docs/memory.md).

A mid-size SD-style teacher (a 78.6 M-parameter UNet2DConditionModel -- SD 1.x's layout at 0.3
of its width --, a 2-layer CLIP text encoder of width 384, a tiny VAE) is written to OUT/teacher
with a latent cache of captioned random images (the GAN's real data). configs/sd15_dmd2.yaml
then runs on it, fp32 on the CPU, batch 2 at 32x32 latents, one generator and one critic update
per iteration, in variants: full or LoRA (r64) fake score, full or LoRA (r64) student, gradient
checkpointing off or on, and the LoRA-student pair in bf16 (frozen weights stored in bf16 under
bf16 autocast, as the shipped GPU recipes run). Each variant runs in a fresh process: the whole
run is built (teacher, data, roles, Trainer), the kernel's RSS high-water mark is reset, one
iteration runs (its peak: "first iteration", with the process's one-time costs -- kernels,
thread pools, primitive caches), the mark is reset again and the remaining iterations run
("warm": what the planner models). Peaks are VmHWM - the RSS after imports: weights, EMA,
optimizer states, gradients, activations, everything the run holds. The time is the median of
the warm iterations. The planner's estimate (`stepdistill plan`) of the same recipe is printed
next to it.

    OMP_NUM_THREADS=1 python docs/scripts/dmd2_levers.py OUT     # ~40 min on 2 busy cores
    OMP_NUM_THREADS=1 python docs/scripts/dmd2_levers.py OUT --teacher-only   # just the teacher + cache
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "sd15_dmd2.yaml"
MID_UNET = {
    "block_out_channels": [96, 192, 384, 384], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 384, "attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 32,
}
BF16 = ["training.mixed_precision=bf16", "memory.teacher_dtype=bf16"]
# (name, --set items)
VARIANTS = [
    ("full student, full fake score", ["fake_score.lora_rank=0"]),
    ("full student, LoRA fake score", ["fake_score.lora_rank=64"]),
    ("full student, full fake score, ckpt", ["fake_score.lora_rank=0", "memory.gradient_checkpointing=true"]),
    ("full student, LoRA fake score, ckpt", ["fake_score.lora_rank=64", "memory.gradient_checkpointing=true"]),
    ("LoRA student, full fake score", ["fake_score.lora_rank=0", "student.lora_rank=64"]),
    ("LoRA student, LoRA fake score", ["fake_score.lora_rank=64", "student.lora_rank=64"]),
    # as the shipped GPU recipes run: frozen weights (teacher, the student's LoRA base) in bf16 under bf16 autocast
    ("LoRA student, full fake score, bf16", ["fake_score.lora_rank=0", "student.lora_rank=64", *BF16]),
    ("LoRA student, LoRA fake score, bf16", ["fake_score.lora_rank=64", "student.lora_rank=64", *BF16]),
]


def common_sets(out: Path) -> list[str]:
    return [f"teacher.path={out / 'teacher'}", "teacher.height=64", "teacher.width=64", f"data.latents={out / 'latents'}",
            "data.prompts_file=null", "training.batch_size=2", "training.mixed_precision=no", "memory.teacher_dtype=null",
            "dmd.critic_updates_per_generator_update=1", "training.num_eval_samples=4"]


def make_teacher(out: Path) -> None:
    """The mid-size teacher pipeline and a latent cache of 16 captioned random 64x64 images."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_pipelines import sd_ddim_scheduler, tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_vae

    from stepdistill.data import TensorImageDataset, write_latent_cache
    from stepdistill.teachers import load_teacher

    if not (out / "teacher" / "model_index.json").is_file():
        torch.manual_seed(0)
        pipe = StableDiffusionPipeline(
            unet=UNet2DConditionModel(**MID_UNET), vae=tiny_vae(seed=1), text_encoder=tiny_clip_text_encoder(seed=2, hidden_size=384),
            tokenizer=tiny_clip_tokenizer(), scheduler=sd_ddim_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(out / "teacher")
    if not (out / "latents").exists():
        teacher = load_teacher(out / "teacher")
        images = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
        captions = [["a cat", "a dog on a mat", "a red house", "a tree"][i % 4] for i in range(16)]
        write_latent_cache(teacher.vae_encode, TensorImageDataset(images, captions=captions), out / "latents", progress=False)


def _rss() -> dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child(job: dict) -> dict:
    """One variant in this (fresh) process."""
    import gc
    import tempfile
    import time

    import torch  # noqa: F401  (imported before the baseline)

    from stepdistill.distillers.memory import apply_memory_levers
    from stepdistill.distillers.registry import load_distill_recipe
    from stepdistill.distillers.run import build_method, load_recipe_teacher, open_run_data
    from stepdistill.training.trainer import Trainer

    gc.collect()
    baseline = _rss()["VmRSS"]
    recipe = load_distill_recipe(RECIPE, set_items=job["sets"])
    teacher = load_recipe_teacher(recipe)
    method = build_method(teacher, recipe, open_run_data(teacher, recipe))
    apply_memory_levers(method, "cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(method, recipe.training, run_dir, log_with=None, progress=False)
        peaks, times = [], []
        for step in range(job["iterations"]):
            if step <= 1:  # before the first iteration (cold) and again before the rest (warm)
                gc.collect()
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # the high-water mark restarts at what the run holds now (loading transients excluded)
            start = time.perf_counter()
            trainer.train_step(step)
            times.append(time.perf_counter() - start)
            if step == 0 or step == job["iterations"] - 1:
                peaks.append(_rss()["VmHWM"] - baseline)
    return {"cold": peaks[0], "warm": peaks[-1], "times": times}


def measure(out: Path, sets: list[str], iterations: int) -> dict:
    job = json.dumps({"sets": common_sets(out) + sets, "iterations": iterations})
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, __file__, "--child", job], env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def planned(out: Path, sets: list[str]) -> int:
    from stepdistill.distillers.plan import plan_recipe
    from stepdistill.distillers.registry import load_distill_recipe

    return plan_recipe(load_distill_recipe(RECIPE, set_items=common_sets(out) + sets), gpus=()).peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="folder for the teacher and the latent cache")
    parser.add_argument("--iterations", type=int, default=4, help="training iterations per variant (the first is not timed)")
    parser.add_argument("--teacher-only", action="store_true", help="write the teacher and the latent cache, measure nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    import statistics

    out = Path(args.out)
    make_teacher(out)
    if args.teacher_only:
        print(f"teacher: {out / 'teacher'}; latent cache: {out / 'latents'}")
        return 0
    mib = 2**20
    rows = {}
    print("| variant | peak, first iteration | peak, warm | planned peak | plan / warm | iteration (median) |")
    print("|---|---|---|---|---|---|")
    for name, sets in VARIANTS:
        result = measure(out, sets, args.iterations)
        plan = planned(out, sets)
        seconds = statistics.median(result["times"][1:])
        rows[name] = (result["warm"], seconds, result["cold"])
        print(f"| {name} | {result['cold'] / mib:.0f} MiB | {result['warm'] / mib:.0f} MiB | {plan / mib:.0f} MiB | "
              f"{plan / result['warm'] - 1:+.1%} | {seconds:.2f} s |", flush=True)
    full = rows["full student, full fake score"]
    print()
    for student in ("full student", "LoRA student", "LoRA student, bf16"):
        name = student.replace(", bf16", "")
        suffix = ", bf16" if "bf16" in student else ""
        with_lora, with_copy = rows[f"{name}, LoRA fake score{suffix}"], rows[f"{name}, full fake score{suffix}"]
        print(f"LoRA fake score / full copy, {student}: {with_lora[0] / with_copy[0]:.2f} x warm peak "
              f"({with_lora[2] / with_copy[2]:.2f} x first-iteration peak)")
    ckpt = rows["full student, full fake score, ckpt"]
    print(f"gradient checkpointing (full fake score): warm peak {ckpt[0] / full[0]:.2f} x ({(full[0] - ckpt[0]) / mib:.0f} MiB less), "
          f"iteration {ckpt[1] / full[1]:.2f} x the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
