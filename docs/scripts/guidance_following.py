"""Does a w-conditioned student follow its teacher's guidance?  FD between the student's samples
at each w and the teacher's 50-step samples at each w (digits classifier features, N samples per
set, the bench's class-balanced labels and seed-0 noise). In each row the smallest FD should sit on
the diagonal: the student at w is closest to the teacher at the same w.

    python docs/scripts/guidance_following.py runs/digits_lcm_w/pipeline --steps 4 --guidance-scales 1 2 3
"""
import argparse

import torch

from stepdistill.digits.bench import balanced_labels, default_teacher_dir, generate_samples, load_pipeline
from stepdistill.digits.classifier import feature_module
from stepdistill.metrics import frechet_distance

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("student")
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--teacher-steps", type=int, default=50)
parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 2.0, 3.0])
parser.add_argument("--num-samples", type=int, default=2000)
args = parser.parse_args()

labels = balanced_labels(args.num_samples)
feature = feature_module()
student, teacher = load_pipeline(args.student), load_pipeline(default_teacher_dir())
ws = args.guidance_scales
ours = {w: generate_samples(student, labels, args.steps, w)[0] for w in ws}
ref = {w: generate_samples(teacher, labels, args.teacher_steps, w)[0] for w in ws}
short = {w: generate_samples(teacher, labels, args.steps, w)[0] for w in ws}
head = " | ".join(f"teacher {args.teacher_steps}-step w={w:g}" for w in ws)
print(f"N = {args.num_samples}; FD between the sets (lower: closer)\n")
print(f"| samples | {head} |\n|---|" + "---:|" * len(ws))
for name, sets in ((f"student {args.steps}-step", ours), (f"teacher {args.steps}-step", short)):
    for w in ws:
        cells = " | ".join(f"{frechet_distance(ref[v], sets[w], feature):.2f}" for v in ws)
        print(f"| {name}, w={w:g} | {cells} |")
