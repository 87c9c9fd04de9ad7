"""Reflow / InstaFlow (stepdistill.distillers.reflow) on a tiny flow-matching pixel teacher:
straightness before and after, the one-step effect, the 1-step export reloading in a fresh process;
couplings shared with DMD's regression cache; pixel teachers with a flow-matching scheduler."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel

from stepdistill.config import from_dict
from stepdistill.distillers.ode_pairs import load_ode_pairs, path_deviation
from stepdistill.distillers.reflow import ReflowDistillation, ReflowRecipe
from stepdistill.distillers.run import distill
from stepdistill.distillers.student import StudentSampler
from stepdistill.errors import RecipeError
from stepdistill.sampling import euler_flow_sample
from stepdistill.teachers import load_teacher
from stepdistill.training.checkpoint import latest_checkpoint, load_role_weights

sys.path.insert(0, str(Path(__file__).parent))
from fresh_process import run_fresh_python  # noqa: E402


def tiny_unet(num_class_embeds=None) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=num_class_embeds)


def train_flow_teacher(steps: int = 100) -> UNet2DModel:
    """A tiny flow-matching teacher of two modes (two fixed +-0.8 patterns): its ODE paths bend
    toward one mode or the other, so they are measurably curved."""
    unet = tiny_unet()
    g = torch.Generator().manual_seed(0)
    modes = torch.sign(torch.randn(2, 1, 8, 8, generator=g)) * 0.8
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    for _ in range(steps):
        x0 = modes[torch.randint(0, 2, (32,), generator=g)] + 0.05 * torch.randn(32, 1, 8, 8, generator=g)
        eps = torch.randn(32, 1, 8, 8, generator=g)
        sigma = torch.rand(32, generator=g)
        x_t = (1 - sigma)[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
        loss = (unet(x_t, sigma * 1000).sample - (eps - x0)).pow(2).mean()  # flow matching: u = eps - x0
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval().requires_grad_(False)


OVERRIDES = {"reflow": {"num_pairs": 128, "pair_steps": 16, "num_steps": 2, "distill_pair_steps": 8, "stage_max_steps": [60, 60],
                        "straightness_samples": 64, "straightness_steps": 8},
             "training": {"batch_size": 16, "checkpoint_every": 60}, "optimizers": {"student": {"lr": 1e-3}}, "ema": None}


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("reflow")
    DDPMPipeline(unet=train_flow_teacher(), scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(root / "teacher")
    overrides = {**OVERRIDES, "teacher": {"path": str(root / "teacher")}}
    out = distill({"method": "reflow"}, root / "run", overrides=overrides, progress=False)
    return root, overrides, out


def test_pixel_flow_teacher_loads_and_its_pipeline_is_the_flow_ode(flow_run):
    """A stock DDPMPipeline with FlowMatchEulerDiscreteScheduler is a flow-matching pixel teacher:
    velocity prediction, x_t = (1 - sigma) x0 + sigma eps, and the pipeline's loop is Euler on its ODE."""
    root, _, _ = flow_run
    teacher = load_teacher(root / "teacher")
    assert teacher.family == "pixel" and teacher.schedule.kind == "flow" and teacher.prediction_type == "flow"
    pipe = DDPMPipeline.from_pretrained(root / "teacher")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np").images
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = euler_flow_sample(teacher, teacher.encode(None), noise, FlowMatchEulerDiscreteScheduler(), 6)
    assert (torch.tensor(images).permute(0, 3, 1, 2) - (ours / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5


def test_reflow_straightens_the_teachers_ode(flow_run):
    """Straightness (mean squared deviation of the 8-step ODE path from the straight path between
    its ends, 64 draws) of the teacher and of the reflowed model from the same noise."""
    root, _, _ = flow_run
    result = json.loads((root / "run" / "straightness.json").read_text())
    assert result["steps"] == 8 and result["samples"] == 64
    assert result["reflowed"] < 0.6 * result["teacher"], result  # measured: 0.0087 -> 0.0034 (0.38x); no training: 1.0x

    # the definition: a straight path scores 0 (a "network" whose velocity is constant along each path)
    teacher = load_teacher(root / "teacher")
    sampler = StudentSampler.for_teacher(teacher, 8, (1, 8, 8))
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    class Straight(torch.nn.Module):  # u = eps - x0 with x0 = 0: the line from noise to the origin
        config = teacher.unet.config
        dtype = torch.float32

        def forward(self, x, t, class_labels=None):
            sigma = (t.float() / 1000).reshape(-1, 1, 1, 1)
            return type("Out", (), {"sample": x / sigma})()

    from stepdistill.distillers.student import with_network

    assert path_deviation(with_network(teacher, Straight()), sampler, noise, teacher.encode(None), 8) < 1e-10
    assert path_deviation(teacher, sampler, noise, teacher.encode(None), 8) > 1e-4


def test_one_step_student_lands_on_the_teacher_ode_and_reloads_in_a_fresh_process(flow_run, tmp_path):
    """The effect: the exported 1-step student's sample from z is closer to the teacher's 16-step
    ODE sample from z (its couplings) than the teacher's own single Euler step; the stock
    DDPMPipeline in a fresh process (no stepdistill) makes exactly the in-memory student's samples."""
    root, overrides, out = flow_run
    assert out == root / "run" / "one_step" / "pipeline"
    assert json.loads((root / "run" / "reflow" / "pipeline" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    teacher = load_teacher(root / "teacher")
    method = ReflowDistillation(teacher, from_dict(ReflowRecipe, {"method": "reflow", **overrides}), None)
    stage = method.build_stage(1, None)
    network = load_role_weights(latest_checkpoint(root / "run" / "one_step"), "student", stage.student, ema=False)
    pairs = load_ode_pairs(root / "run" / "teacher_pairs.safetensors")
    z, y = pairs["noise"][:64], pairs["sample"][:64]
    cond = teacher.encode(None)
    before = float((stage.sample(teacher.unet, z, cond) - y).pow(2).mean())
    after = float((stage.sample(network, z, cond) - y).pow(2).mean())
    assert after < 0.5 * before, (before, after)  # measured: 0.179 -> 0.046 (0.26x); no training: 1.0x

    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = (stage.sample(network, noise, cond) / 2 + 0.5).clamp(0, 1)
    stdout = run_fresh_python(f"""
        import json, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(out)!r})
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=4, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np").images
        print(json.dumps({{"images": images.tolist(), "scheduler": type(pipe.scheduler).__name__}}))
    """, cwd=tmp_path)
    got = json.loads(stdout.strip().splitlines()[-1])
    assert got["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert (torch.tensor(got["images"]).permute(0, 3, 1, 2) - ours).abs().max() < 1e-5


# -- couplings: one code path for DMD and reflow ------------------------------------------------
def test_reflow_couplings_are_dmds_regression_pairs(tmp_path):
    """VP teacher: `--make-pairs` of a reflow recipe and of a DMD recipe (same steps, guidance,
    seed) write the same probability-flow ODE pairs."""
    from safetensors.torch import load_file

    from stepdistill.cli import main
    from stepdistill.export import save_class_conditional_pipeline

    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing")
    save_class_conditional_pipeline(tiny_unet(num_class_embeds=11), scheduler, tmp_path / "teacher")
    common = ["--set", f"teacher.path={tmp_path / 'teacher'}", "--set", "teacher.guidance_scale=2.0", "--make-pairs", "12"]
    (tmp_path / "reflow.yaml").write_text(f"method: reflow\nreflow: {{pairs: {tmp_path / 'reflow.safetensors'}, pair_steps: 3}}\n")
    (tmp_path / "dmd.yaml").write_text(f"method: dmd\ndmd: {{regression_pairs: {tmp_path / 'dmd.safetensors'}, pair_steps: 3, regression_weight: 0.25}}\n")
    assert main(["distill", str(tmp_path / "reflow.yaml"), *common]) == 0
    assert main(["distill", str(tmp_path / "dmd.yaml"), *common]) == 0
    a, b = load_file(tmp_path / "reflow.safetensors"), load_file(tmp_path / "dmd.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["sample"].shape == (12, 1, 8, 8) and a["condition_index"].tolist() == [i % 10 for i in range(12)]


def test_bad_reflow_recipes_are_one_line_errors():
    teacher_like = type("T", (), {})
    with pytest.raises(RecipeError, match="student.num_steps must be 1"):
        ReflowDistillation(teacher_like, from_dict(ReflowRecipe, {"method": "reflow", "student": {"num_steps": 2}}), None)
    with pytest.raises(RecipeError, match=r"stage_max_steps takes 2 entries"):
        ReflowDistillation(teacher_like, from_dict(ReflowRecipe, {"method": "reflow", "reflow": {"stage_max_steps": [1]}}), None)
    with pytest.raises(RecipeError, match="reflow teacher couplings not found"):
        load_ode_pairs("/nonexistent/pairs.safetensors", "reflow teacher couplings")


# -- class-conditional pixel flow teachers ------------------------------------------------------
def test_class_conditional_pipeline_samples_a_flow_matching_unet(tmp_path):
    """The widened pixel teacher: ClassConditionalPipeline with FlowMatchEulerDiscreteScheduler
    (no init_noise_sigma, no scale_model_input) is Euler on the flow ODE, as the teacher samples it."""
    from diffusers import DiffusionPipeline

    from stepdistill.export import save_class_conditional_pipeline

    out = save_class_conditional_pipeline(tiny_unet(num_class_embeds=11), FlowMatchEulerDiscreteScheduler(), tmp_path / "pipe", num_inference_steps=4)
    teacher = load_teacher(out)
    assert teacher.schedule.kind == "flow" and teacher.num_classes == 10
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    images = pipe([1, 2, 3], latents=noise, guidance_scale=2.0, output_type="pt").images
    ours = euler_flow_sample(teacher, teacher.encode([1, 2, 3]), noise, FlowMatchEulerDiscreteScheduler(), 4, guidance_scale=2.0)
    assert (images - (ours / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5


def test_reflow_of_a_tiny_flux_teacher_exports_a_one_step_flux_pipeline(tmp_path):
    """Flux (text-conditioned, dynamic shift): couplings by FluxPipeline's own Euler schedule, both
    stages, and a 1-step FluxPipeline that makes the in-memory student's latents."""
    from diffusers import FluxPipeline

    from stepdistill.teachers.flux import pack_latents, unpack_latents
    from tiny_pipelines import tiny_flux_pipeline

    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    overrides = {"teacher": {"path": str(tmp_path / "flux"), "height": 32, "width": 32}, "data": {"prompts": ["a cat", "a dog"]},
                 "reflow": {"num_pairs": 4, "pair_steps": 4, "num_steps": 2, "distill_pair_steps": 2, "stage_max_steps": [2, 2],
                            "straightness_samples": 2, "straightness_steps": 4},
                 "training": {"batch_size": 2, "checkpoint_every": 2}, "optimizers": {"student": {"lr": 1e-3}}}
    out = distill({"method": "reflow"}, tmp_path / "run", overrides=overrides, progress=False)
    teacher = load_teacher(tmp_path / "flux")
    shape = tuple(teacher.sample_shape(32, 32))
    pairs = load_ode_pairs(tmp_path / "run" / "teacher_pairs.safetensors")
    stock = FluxPipeline.from_pretrained(tmp_path / "flux")
    stock.set_progress_bar_config(disable=True)
    z = pairs["noise"][:1]
    y = stock("a cat", latents=pack_latents(z), num_inference_steps=4, height=32, width=32, output_type="latent").images
    assert (unpack_latents(y, *shape[1:]) - pairs["sample"][:1]).abs().max() < 1e-4  # a coupling = the stock pipeline's ODE sample
    assert json.loads((tmp_path / "run" / "straightness.json").read_text())["steps"] == 4

    method = ReflowDistillation(teacher, from_dict(ReflowRecipe, {"method": "reflow", **overrides}), None)
    stage = method.build_stage(1, None)
    network = load_role_weights(latest_checkpoint(tmp_path / "run" / "one_step"), "student", stage.student, ema=True)
    ours = stage.sample(network, z, teacher.encode(["a cat"]))
    pipe = FluxPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a cat", latents=pack_latents(z), num_inference_steps=1, height=32, width=32, output_type="latent").images
    assert (unpack_latents(theirs, *shape[1:]) - ours).abs().max() < 1e-4
