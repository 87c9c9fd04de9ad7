"""Peak RSS of VSD with a LoRA fake score against a full copy, measured on the same run
(docs/score_distillation.md).

Builds an SD 1.x-layout pipeline whose UNet has ~79 M parameters (docs/scripts/memory_check.py's
MID_UNET, cross attention 32 wide to match the tiny CLIP text encoder of tests/tiny_pipelines.py,
whose tiny VAE it also uses), saves it, and runs configs/sd15_vsd.yaml on it twice, each in a fresh
process: fake_score.lora_rank 64 (as shipped: a LoRA on the frozen teacher) and 0 (a second full
copy of the UNet). Everything else is the same: full student, 3 steps, batch 2, 32 x 32 pixels
(16 x 16 latents), fp32. Each process reports its peak resident set size (VmHWM) at the end.
glibc keeps freed memory mapped unless told otherwise: the processes run with
MALLOC_MMAP_THRESHOLD_=65536, as stepdistill.planning.rss does, so RSS follows live tensors.

    OMP_NUM_THREADS=1 python docs/scripts/vsd_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MID_UNET = {  # ~79 M parameters: SD 1.x's layout at 0.3 of its width
    "block_out_channels": [96, 192, 384, 384], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 16, "in_channels": 4, "out_channels": 4,
}
CHILD = r"""
import json, sys
from stepdistill.distillers.run import distill
recipe, out, sets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
distill(recipe, out, set_items=sets, progress=False, evaluate=False, report=False)
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps({"peak_rss_kib": int(status["VmHWM"].split()[0])}))
"""


def build_teacher(directory: Path) -> int:
    import torch
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(**MID_UNET)
    pipe.register_modules(unet=pipe.unet)
    pipe.save_pretrained(directory)
    return sum(p.numel() for p in pipe.unet.parameters())


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = build_teacher(tmp / "teacher")
        common = [f"teacher.path={tmp / 'teacher'}", "teacher.height=32", "teacher.width=32", "data.prompts_file=null",
                  "data.prompts=[a cat, a dog on a mat]", "training.max_steps=3", "training.batch_size=2",
                  "training.mixed_precision=no", "training.checkpoint_every=1000", "training.eval_every=0"]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        rows = []
        for name, rank in (("LoRA fake score (rank 64, on the teacher's weights)", 64), ("full copy of the UNet", 0)):
            sets = [*common, f"fake_score.lora_rank={rank}"]
            done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "configs" / "sd15_vsd.yaml"), str(tmp / f"run{rank}"), json.dumps(sets)],
                                  env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append((name, json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_kib"] / 2**20))
    print(f"UNet: {params / 1e6:.1f} M parameters; configs/sd15_vsd.yaml, full student, 3 steps, batch 2, 16x16 latents, fp32\n")
    print("| fake score | peak RSS |")
    print("|---|---:|")
    for name, gib in rows:
        print(f"| {name} | {gib:.2f} GiB |")
    print(f"| difference | {rows[1][1] - rows[0][1]:.2f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
