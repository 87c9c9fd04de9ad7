"""Seconds per training step of each arm of the score-distillation ablation, measured in one process
(docs/score_distillation.md): the common step budget per minute that turns "equal steps" into
"equal minutes" when the runs themselves were timed under different CPU contention.

Each arm is its shipped digits recipe at guidance w = 1 (batch 64, the recipe's TTUR), built from
the recipe as `stepdistill distill` builds it; the arms take turns (``--rounds`` rounds of
``--steps`` timed steps after a warm-up), so a change of load hits all of them alike. Reported:
CPU seconds per step of this process (at one thread: quiet-machine wall seconds) and wall seconds.

    OMP_NUM_THREADS=1 python docs/scripts/score_step_cost.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
ARMS = {
    "SDS": ("digits_sds.yaml", {}),
    "VSD": ("digits_vsd.yaml", {"teacher": {"guidance_scale": 1.0}}),
    "SiD": ("digits_sid.yaml", {}),
    "SiDA": ("digits_sida.yaml", {}),
    "DMD2": ("digits_dmd2.yaml", {"teacher": {"guidance_scale": 1.0}}),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    from stepdistill.config import merge
    from stepdistill.distillers.registry import load_distill_recipe
    from stepdistill.distillers.run import build_method, load_recipe_teacher, open_run_data
    from stepdistill.training.trainer import Trainer

    torch.manual_seed(0)
    trainers, done = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (recipe_name, overrides) in ARMS.items():
            recipe = load_distill_recipe(ROOT / "configs" / recipe_name, merge(overrides, {"training": {"checkpoint_every": 10**6, "eval_every": 0}}))
            teacher = load_recipe_teacher(recipe)
            method = build_method(teacher, recipe, open_run_data(teacher, recipe))
            trainers[name] = Trainer(method, recipe.training, Path(tmp) / name, log_with=None, progress=False)
            for step in range(3):  # warm-up
                trainers[name].train_step(step)
            done[name] = [3, 0.0, 0.0]
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step(done[name][0])
                    done[name][0] += 1
                done[name][1] += time.process_time() - cpu
                done[name][2] += time.perf_counter() - wall
    timed = args.steps * args.rounds
    print(f"{timed} timed steps per arm (batch 64), {torch.get_num_threads()} thread(s)\n")
    print("| arm | CPU s / step | wall s / step | steps per CPU minute |")
    print("|---|---:|---:|---:|")
    for name, (_, cpu, wall) in done.items():
        print(f"| {name} | {cpu / timed:.3f} | {wall / timed:.3f} | {60 * timed / cpu:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
