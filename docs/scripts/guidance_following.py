"""Does a w-conditioned student follow its teacher's guidance?  FD between the student's samples
at each w and the teacher's 50-step samples at each w (digits classifier features, N samples per
set, the bench's class-balanced labels and seed-0 noise). In each row the smallest FD should sit on
the diagonal: the student at w is closest to the teacher at the same w.

    python docs/scripts/guidance_following.py runs/digits_lcm_w/pipeline --steps 4 --guidance-scales 1 2 3

A student with one w baked in (its pipeline runs at guidance_scale 1): ``--student-guidance-scales 1``
gives its one row against every teacher column.
``--teacher-cache FILE`` keeps the teacher's sample sets (they do not depend on the student) in a
safetensors file, written on the first run and read on the next ones with the same settings.
"""
import argparse
import os


from stepdistill.digits.bench import balanced_labels, default_teacher_dir, generate_samples, load_pipeline
from stepdistill.digits.classifier import feature_module
from stepdistill.metrics import frechet_distance

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("student")
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--teacher-steps", type=int, default=50)
parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 2.0, 3.0])
parser.add_argument("--num-samples", type=int, default=2000)
parser.add_argument("--student-guidance-scales", type=float, nargs="+", default=None,
                    help="the student's w per row (default: --guidance-scales); 1 for a student with one w baked in")
parser.add_argument("--teacher-cache", default=None, help="safetensors file for the teacher's sample sets")
args = parser.parse_args()

labels = balanced_labels(args.num_samples)
feature = feature_module()
student, teacher = load_pipeline(args.student), load_pipeline(default_teacher_dir())
ws = args.guidance_scales
student_ws = args.student_guidance_scales or ws
ours = {w: generate_samples(student, labels, args.steps, w)[0] for w in student_ws}
key = lambda kind, steps, w: f"{kind}/{steps}/{w:g}/{args.num_samples}"  # noqa: E731
cached = {}
if args.teacher_cache and os.path.isfile(args.teacher_cache):
    from safetensors.torch import load_file

    cached = load_file(args.teacher_cache)


def teacher_samples(steps, w):
    if key("teacher", steps, w) not in cached:
        cached[key("teacher", steps, w)] = generate_samples(teacher, labels, steps, w)[0].contiguous()
    return cached[key("teacher", steps, w)]


ref = {w: teacher_samples(args.teacher_steps, w) for w in ws}
short = {w: teacher_samples(args.steps, w) for w in ws}
if args.teacher_cache:
    from safetensors.torch import save_file

    save_file(cached, args.teacher_cache)
head = " | ".join(f"teacher {args.teacher_steps}-step w={w:g}" for w in ws)
print(f"N = {args.num_samples}; FD between the sets (lower: closer)\n")
print(f"| samples | {head} |\n|---|" + "---:|" * len(ws))
for name, sets in ((f"student {args.steps}-step", ours), (f"teacher {args.steps}-step", short)):
    for w in sets:
        cells = " | ".join(f"{frechet_distance(ref[v], sets[w], feature):.2f}" for v in ws)
        print(f"| {name}, w={w:g} | {cells} |")
