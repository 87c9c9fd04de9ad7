"""Where along the trajectory does a w-conditioned LCM student lose the teacher's guidance?

For noise z and guidance w, the teacher's 50-step DDIM sampler at w (CFG) visits x_{t_0}, ...,
x_{t_49} and ends at x_end(w). A perfect consistency function maps every state to that end:
f(x_{t_n}, t_n, w) = x_end(w). This prints, for each w and a few t_n of the student's 4-step grid,
the mean squared error of the student's f (LCM's boundary-scaled x0 estimate, from the exported
LCMScheduler's scalings) against x_end(w), and, for reference, against x_end(1) (the unguided end
from the same noise): an under-guided student sits closer to x_end(1) than a guided one. A student
with one w baked in (no w input) ignores w: its rows say which teacher w it matches.

    python docs/scripts/lcm_guidance_profile.py runs/digits_lcm_w/pipeline --guidance-scales 1 2 3
"""
import argparse

import torch

from stepdistill.digits.bench import balanced_labels, default_teacher_dir, load_pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("student")
parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 2.0, 3.0])
parser.add_argument("--num-samples", type=int, default=500)
parser.add_argument("--timesteps", type=int, nargs="+", default=[999, 759, 499, 259, 99, 19])
args = parser.parse_args()

student, teacher = load_pipeline(args.student), load_pipeline(default_teacher_dir())
labels = balanced_labels(args.num_samples)
noise = torch.randn(args.num_samples, 1, 8, 8, generator=torch.Generator().manual_seed(0))
abar = teacher.scheduler.alphas_cumprod
null = torch.full_like(labels, 10)


@torch.no_grad()
def teacher_trajectory(w):
    """{t: x_t} along the teacher's 50-step CFG DDIM sampler at w, and its end."""
    scheduler = teacher.scheduler
    scheduler.set_timesteps(50)
    x, states = noise.clone(), {}
    for t in scheduler.timesteps:
        states[int(t)] = x
        tt = torch.full((x.shape[0],), int(t))
        v_c = teacher.unet(x, tt, class_labels=labels).sample
        v_u = teacher.unet(x, tt, class_labels=null).sample
        x = scheduler.step(v_u + w * (v_c - v_u), t, x).prev_sample
    return states, x


@torch.no_grad()
def consistency_fn(x, t, w):
    """The exported student's f(x, t, w): c_skip x + c_out x0, x0 from its v-prediction."""
    from diffusers import StableDiffusionPipeline

    tt = torch.full((x.shape[0],), t)
    dim = getattr(student.unet.config, "time_cond_proj_dim", None)
    if dim is None:  # guidance baked in: the student ignores w (the table shows which teacher w it matches)
        v = student.unet(x, tt, class_labels=labels).sample
    else:
        cond = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.full((x.shape[0],), w - 1.0), embedding_dim=dim)
        v = student.unet(x, tt, class_labels=labels, timestep_cond=cond).sample
    a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
    x0 = a * x - s * v
    c_skip, c_out = student.scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
    return c_skip * x + c_out * x0


_, unguided_end = teacher_trajectory(1.0)
print(f"N = {args.num_samples}; mean squared error of f(x_t, t, w) on the teacher's 50-step CFG trajectory at w\n")
print("| w | " + " | ".join(f"t={t}" for t in args.timesteps) + " |\n|---:|" + "---:|" * len(args.timesteps))
gaps = {}
for w in args.guidance_scales:
    states, end = teacher_trajectory(w)
    gaps[w] = float((end - unguided_end).pow(2).mean())
    errs = [float((consistency_fn(states[t], t, w) - end).pow(2).mean()) for t in args.timesteps]
    refs = [float((consistency_fn(states[t], t, w) - unguided_end).pow(2).mean()) for t in args.timesteps]
    print(f"| {w:g} | " + " | ".join(f"{e:.4f} ({r:.4f})" for e, r in zip(errs, refs)) + " |")
print("\n(in brackets: against the unguided end x_end(1); |x_end(w) - x_end(1)|^2 for reference: "
      + ", ".join(f"w={w:g}: {g:.4f}" for w, g in gaps.items()) + ")")
