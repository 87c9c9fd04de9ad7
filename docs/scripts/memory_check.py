"""Estimated against measured peak memory of real CPU training steps (docs/memory.md).

For each case: the planner's estimate of one trained UNet2DConditionModel role (built on the
meta device), and the peak RSS increase of two real training steps of the same network in a
fresh process (stepdistill.planning.rss). Prints a markdown table.

    OMP_NUM_THREADS=1 python docs/scripts/memory_check.py            # small + mid-size (~8 min on 2 cores)
    OMP_NUM_THREADS=1 python docs/scripts/memory_check.py --quick    # small only (~3 min)
"""

from __future__ import annotations

import argparse
import sys

from stepdistill.planning import RoleSpec, Workload, estimate_memory
from stepdistill.planning.rss import estimated_increase, measure_training_steps

SMALL_UNET = {  # ~9 M parameters, the mid-size layout at a third of the width
    "_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64, 128, 128], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 128, "attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 32,
}
MID_UNET = {  # ~79 M parameters: SD 1.x's layout at 0.3 of its width
    **SMALL_UNET, "block_out_channels": [96, 192, 384, 384], "cross_attention_dim": 384,
}

# (name, config, trainable, gradient checkpointing, batch, latent size)
CASES = [
    ("small", SMALL_UNET, "full", False, 4, 64),
    ("small", SMALL_UNET, "full", True, 4, 64),
    ("small", SMALL_UNET, "lora", False, 4, 64),
    ("mid", MID_UNET, "full", False, 2, 32),
    ("mid", MID_UNET, "full", False, 2, 64),
    ("mid", MID_UNET, "full", True, 2, 64),
    ("mid", MID_UNET, "lora", False, 2, 64),
]
TEXT_TOKENS = 16


def run(cases, raw_malloc: bool = False):
    """One row per case: the estimate, and the measured peak increase after a warm-up step
    ("warm": what the estimate models) and straight after building the network ("cold": the
    process's one-time costs of a first step included)."""
    rows = []
    for name, config, trainable, checkpointing, batch, size in cases:
        spec = RoleSpec(name, config=config, trainable=trainable, lora_rank=16, gradient_checkpointing=checkpointing)
        workload = Workload(batch, size, size, TEXT_TOKENS)
        estimate = estimated_increase(estimate_memory([spec], workload))
        warm = measure_training_steps(spec, workload, warmup=True, raw_malloc=raw_malloc)
        cold = measure_training_steps(spec, workload, warmup=False, raw_malloc=raw_malloc)
        rows.append((name, warm.parameters, trainable + (" + ckpt" if checkpointing else ""), batch, size,
                     estimate, warm.peak_increase, cold.peak_increase, warm.seconds))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small network only")
    parser.add_argument("--raw-malloc", action="store_true", help="measure with glibc's default malloc thresholds")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if c[0] == "small"] if args.quick else CASES
    print("| network | parameters | trained | batch | latent | estimated | measured warm | error | measured cold | error | 2 steps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    mib = 2**20
    for name, params, trained, batch, size, estimate, warm, cold, seconds in run(cases, args.raw_malloc):
        worst = max(worst, abs(estimate / warm - 1))
        print(f"| {name} | {params / 1e6:.1f} M | {trained} | {batch} | {size}x{size} | {estimate / mib:.0f} MiB "
              f"| {warm / mib:.0f} MiB | {estimate / warm - 1:+.1%} | {cold / mib:.0f} MiB | {estimate / cold - 1:+.1%} | {seconds:.1f} s |")
    print(f"\nlargest error against the warm measurement: {worst:.1%}")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
