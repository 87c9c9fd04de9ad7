"""Runs compared at equal training minutes: each run's periodic FD (its ``curve.jsonl``, the
training-time evaluator's N) at the last evaluation at or before each mark, plus its last row.

    python docs/scripts/curve_at_minutes.py runs/abl_sds runs/abl_vsd runs/digits_sid runs/abl_sida runs/abl_dmd2 \
        --names SDS VSD SiD SiDA DMD2 --minutes 1 2 3 4 5 6

A cell is empty when the run had not been evaluated by that mark. Minutes are wall-clock since the
run started (``stepdistill curve`` plots the same rows).
"""
import argparse
import json
from pathlib import Path

from stepdistill.evaluation.report import read_curve

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("run_dirs", nargs="+")
parser.add_argument("--names", nargs="+", default=None)
parser.add_argument("--minutes", type=float, nargs="+", default=[1, 2, 3, 4, 5, 6])
parser.add_argument("--metric", default="fd")
args = parser.parse_args()
names = args.names or [Path(d).name for d in args.run_dirs]

print(f"{args.metric} of the periodic evaluation, last evaluation at or before each mark\n")
print("| run | steps | " + " | ".join(f"<= {m:g} min" for m in args.minutes) + " | last (step, min) | best |")
print("|---|---:|" + "---:|" * (len(args.minutes) + 2))
for run_dir, name in zip(args.run_dirs, names):
    rows = [r for r in read_curve(run_dir) if r.get(args.metric) is not None]
    recipe = json.loads((Path(run_dir) / "run.json").read_text()).get("recipe", {}) if (Path(run_dir) / "run.json").is_file() else {}
    cells = []
    for mark in args.minutes:
        before = [r for r in rows if r["minutes"] <= mark]
        cells.append(f"{before[-1][args.metric]:.2f}" if before else "")
    last = rows[-1]
    best = min(r[args.metric] for r in rows)
    steps = recipe.get("training", {}).get("max_steps", "?")
    print(f"| {name} | {steps} | " + " | ".join(cells) + f" | {last[args.metric]:.2f} ({last['step']}, {last['minutes']:.2f}) | {best:.2f} |")
