"""Hybrid inference (stepdistill.hybrid, pipelines/hybrid_class_conditional_pipeline.py): one
directory carrying the teacher and the student, the teacher for the first k steps; it reloads in
a fresh process, k = 0 / K reproduce the student / the teacher, the digits benchmark scores it,
and bad input is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from stepdistill.cli import main
from stepdistill.errors import StepdistillError
from stepdistill.export import save_class_conditional_pipeline
from stepdistill.sampling import make_student_scheduler
from stepdistill.hybrid import save_hybrid_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from fresh_process import run_fresh_python  # noqa: E402


def unet(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11).eval()


def scheduler(prediction_type: str = "v_prediction") -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, timestep_spacing="trailing", clip_sample=False)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    save_class_conditional_pipeline(unet(0), scheduler(), root / "teacher", guidance_scale=1.0)
    save_class_conditional_pipeline(unet(1), make_student_scheduler(scheduler(), 3), root / "student3", num_inference_steps=3)
    save_class_conditional_pipeline(unet(2), make_student_scheduler(scheduler(), 1), root / "student1", num_inference_steps=1)
    return root


def test_hybrid_directory_runs_the_teacher_first_and_reloads_in_a_fresh_process(dirs, tmp_path):
    out = save_hybrid_pipeline(dirs / "student3", dirs / "teacher", tmp_path / "hybrid", teacher_steps=1, teacher_guidance_scale=2.0)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["hybrid_class_conditional_pipeline", "HybridClassConditionalPipeline"]
    assert (index["default_num_inference_steps"], index["default_teacher_steps"], index["default_teacher_guidance_scale"]) == (3, 1, 2.0)
    got = json.loads(run_fresh_python(f"""
        import json, torch
        from diffusers import DiffusionPipeline
        hybrid = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)
        student = DiffusionPipeline.from_pretrained({str(dirs / 'student3')!r}, trust_remote_code=True)
        teacher = DiffusionPipeline.from_pretrained({str(dirs / 'teacher')!r}, trust_remote_code=True)
        teacher.scheduler = student.scheduler  # the teacher on the student's 3-step timesteps
        for p in (hybrid, student, teacher):
            p.set_progress_bar_config(disable=True)
        labels = [0, 1, 2, 3]
        noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        run = lambda pipe, **kw: pipe(labels, latents=noise, output_type="pt", **kw).images
        # by hand: the teacher's guided step at t_0, then the student's steps
        s = student.scheduler
        s.set_timesteps(3)
        x = noise
        for i, t in enumerate(s.timesteps):
            net = teacher.unet if i == 0 else student.unet
            if i == 0:
                both = net(torch.cat([x, x]), t.expand(8), class_labels=torch.tensor([10] * 4 + labels)).sample
                u, c = both.chunk(2)
                out = u + 2.0 * (c - u)
            else:
                out = net(x, t.expand(4), class_labels=torch.tensor(labels)).sample
            x = s.step(out, t, x).prev_sample
        by_hand = (x / 2 + 0.5).clamp(0, 1)
        diff = lambda a, b: float((a - b).abs().max())
        print(json.dumps({{
            "default_vs_by_hand": diff(run(hybrid), by_hand),
            "k0_vs_student": diff(run(hybrid, teacher_steps=0), run(student)),
            "k3_vs_teacher": diff(run(hybrid, teacher_steps=3, teacher_guidance_scale=1.0), run(teacher, num_inference_steps=3)),
            "k1_vs_student": diff(run(hybrid), run(student)),
        }}))
    """, cwd=tmp_path).strip().splitlines()[-1])
    assert got["default_vs_by_hand"] < 1e-6 and got["k0_vs_student"] < 1e-6 and got["k3_vs_teacher"] < 1e-6
    assert got["k1_vs_student"] > 1e-3  # the teacher's first step changed the samples


def test_a_one_step_student_gets_one_teacher_step_more_and_the_digits_benchmark_scores_it(dirs, tmp_path):
    from stepdistill.digits.plugin import DigitsBenchmark

    out = save_hybrid_pipeline(dirs / "student1", dirs / "teacher", tmp_path / "hybrid")
    assert json.loads((out / "model_index.json").read_text())["default_num_inference_steps"] == 2  # teacher 1 + student 1
    benchmark = DigitsBenchmark()
    pipe = benchmark.load(str(out))
    assert type(pipe).__name__ == "HybridClassConditionalPipeline"
    images = benchmark.generate(pipe, torch.arange(20) % 10, 2, 1.0, batch_size=8)
    assert images.shape == (20, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    card = (out / "README.md").read_text()
    assert (out / "hybrid_class_conditional_pipeline.py").is_file() and 'from_pretrained("hybrid", trust_remote_code=True)' in card
    from stepdistill.evaluation.generation import load_eval_pipeline
    from stepdistill.evaluation.latency import measure_latency

    model = load_eval_pipeline(out)  # NFE counts both networks: the teacher's step and the student's
    assert len(model.denoisers) == 2
    latency = measure_latency(lambda: model.pipe([0, 1], output_type="pt").images.shape[0], model.denoisers, repeats=1)
    assert latency["nfe"] == 2


def test_bad_input_is_one_line(dirs, tmp_path, capsys):
    save_class_conditional_pipeline(unet(3), make_student_scheduler(scheduler("epsilon"), 2), tmp_path / "eps_student", num_inference_steps=2)
    with pytest.raises(StepdistillError, match="the student predicts epsilon and the teacher v_prediction"):
        save_hybrid_pipeline(tmp_path / "eps_student", dirs / "teacher", tmp_path / "out")
    with pytest.raises(StepdistillError, match=r"teacher_steps must lie in \[0, num_inference_steps=3\]"):
        save_hybrid_pipeline(dirs / "student3", dirs / "teacher", tmp_path / "out", teacher_steps=4, num_inference_steps=3)
    save_class_conditional_pipeline(unet(4), make_student_scheduler(scheduler(), 1, init_timestep=755), tmp_path / "init_student", num_inference_steps=1)
    with pytest.raises(StepdistillError, match="the student's noise schedule ends at timestep 755 .student.init_timestep."):
        save_hybrid_pipeline(tmp_path / "init_student", dirs / "teacher", tmp_path / "out")
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4),
                 scheduler=scheduler()).save_pretrained(tmp_path / "uncond")
    assert main(["hybrid", str(tmp_path / "uncond"), str(tmp_path / "out"), "--teacher", str(dirs / "teacher")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("stepdistill hybrid: error:") and "built from class-conditional pixel pipelines" in err
    assert not (tmp_path / "out").exists()


# -- latent teachers: the documented two-pipeline recipe ------------------------------------------
def hybrid_recipe_block() -> str:
    """The python block of docs/step_halving.md's latent hybrid recipe."""
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "step_halving.md").read_text()
    section = text.split("### Latent teachers: two pipelines, one callback", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_latent_hybrid_recipe_hands_the_student_over_after_k_teacher_steps(tmp_path):
    """The recipe as written in the docs (stock diffusers, a callback that swaps the UNet), on tiny
    SD pipelines: k = 0 is the student, k = K the teacher's UNet on the student's scheduler, k = 1 neither."""
    from tiny_pipelines import tiny_sd_pipeline

    teacher = tiny_sd_pipeline()
    teacher.save_pretrained(tmp_path / "teacher")
    student = tiny_sd_pipeline()
    torch.manual_seed(5)
    for p in student.unet.parameters():
        p.data += 0.05 * torch.randn_like(p)
    student.scheduler = make_student_scheduler(student.scheduler, 3)
    student.save_pretrained(tmp_path / "student")
    code = hybrid_recipe_block().replace("TEACHER_DIR", str(tmp_path / "teacher")).replace("STUDENT_DIR", str(tmp_path / "student"))
    scope: dict = {}
    exec(code, scope)  # defines hybrid() and samples once, as the docs do
    kwargs = dict(num_inference_steps=3, guidance_scale=1.0, output_type="np")

    def run(k=None, pipe=None):
        generator = torch.Generator().manual_seed(0)
        if pipe is not None:
            return torch.as_tensor(pipe("a photo of a cat", generator=generator, **kwargs).images)
        return torch.as_tensor(scope["hybrid"]("a photo of a cat", k=k, generator=generator, **kwargs))

    from diffusers import DiffusionPipeline

    reference = DiffusionPipeline.from_pretrained(tmp_path / "student")
    reference.set_progress_bar_config(disable=True)
    alone = run(pipe=reference)
    reference.unet = DiffusionPipeline.from_pretrained(tmp_path / "teacher").unet
    teacher_only = run(pipe=reference)
    assert (run(0) - alone).abs().max() < 1e-6
    assert (run(3) - teacher_only).abs().max() < 1e-6
    one = run(1)
    assert (one - alone).abs().max() > 1e-4 and (one - teacher_only).abs().max() > 1e-4
