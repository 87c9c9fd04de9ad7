"""Are samples copies of training digits? Median nearest-neighbour L2 distance (pixels in [-1, 1])
to the digits training split for 2000 samples of the teacher (50 steps, w = 1 and 2), of each
PIPELINE:STEPS given, and for the held-out real digits (docs/dmd2.md).

    python docs/scripts/nearest_training_digit.py runs/digits_dmd2/pipeline:1
"""
import sys
import torch
from stepdistill.digits.data import load_split
from stepdistill.digits.bench import load_pipeline, default_teacher_dir
train = load_split("train").images.flatten(1)
def nn(x): return torch.cdist(x, train).min(dim=1).values
labels = (torch.arange(2000) % 10).tolist()
runs = [("teacher 50-step w=1", default_teacher_dir(), 50, 1.0), ("teacher 50-step w=2", default_teacher_dir(), 50, 2.0)]
runs += [(f"{p} {s}-step", p, int(s), 1.0) for p, s in (a.split(":") for a in sys.argv[1:])]
for name, path, steps, w in runs:
    pipe = load_pipeline(path)
    imgs = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=w, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    d = nn((imgs * 2 - 1).flatten(1))
    print(f"| {name} | {d.median().item():.2f} | {(d < 2.0).float().mean().item():.3f} |")
d = nn(load_split("heldout").images.flatten(1))
print(f"| held-out real digits ({len(d)}) | {d.median().item():.2f} | {(d < 2.0).float().mean().item():.3f} |")
