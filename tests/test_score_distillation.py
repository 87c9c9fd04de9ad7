"""The score-distillation family (SDS, VSD / SwiftBrush, SiD, SiDA; LSG and SNOOPI guidance) on a
tiny class-conditional pixel teacher: the arithmetic of each generator loss and guidance switch,
SiD's time range, the non-finite guard, SiDA's parameter-free discriminator, recipes, and an
image-free VSD run that never reads a dataset image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from stepdistill.config import from_dict, merge
from stepdistill.distillers.base import RunData
from stepdistill.distillers.fake_score import FakeScore, denoising_loss, drop_conditions
from stepdistill.distillers.registry import load_distill_recipe
from stepdistill.distillers.registry import method_class
from stepdistill.distillers.score_distillation import ScoreDistillationMethod, ScoreDistillationRecipe
from stepdistill.errors import RecipeError, StepdistillError, TrainingDiverged
from stepdistill.schedule import FlowSchedule
from stepdistill.teachers.pixel import PixelUNetTeacher
from stepdistill.training.trainer import StepContext, Trainer

ROOT = Path(__file__).resolve().parent.parent


def tiny_pixel_teacher() -> PixelUNetTeacher:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=11,
    )
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    return PixelUNetTeacher(unet, scheduler, pipeline_class="ClassConditionalPipeline")


def recipe_with(method: str, **sections) -> ScoreDistillationRecipe:
    base = {"method": method, "training": {"max_steps": 4, "batch_size": 8, "eval_every": 0, "checkpoint_every": 100, "log_every": 1}}
    return from_dict(ScoreDistillationRecipe, merge(base, sections))


def make(method: str, real=None, model=None, **sections) -> ScoreDistillationMethod:
    """The method on in-memory data: every class as conditions; ``real`` = (images, labels) for SiDA;
    ``model``: the teacher (default a fresh tiny one); ``sections``: recipe sections."""
    teacher = model or tiny_pixel_teacher()
    data = RunData.in_memory(teacher) if real is None else RunData.in_memory(teacher, *real)
    m = method_class(method)(teacher, recipe_with(method, **sections), data)
    return m


def trainer_for(method, tmp_path, name="run") -> Trainer:
    return Trainer(method, method.recipe.training, tmp_path / name, log_with=None, progress=False)


def batch(method, ctx):
    """What a training step draws first: conditions, noise, G's one-step sample (with grad)."""
    cond = method.pool.index(ctx.randint(0, len(method.pool)))
    x = method.generate(ctx, ctx.randn(*method.shape), cond, torch.zeros(ctx.local_batch_size, dtype=torch.long), grad=True)
    return cond, x


def white_digits():
    return torch.ones(32, 1, 8, 8), torch.arange(32) % 10


# -- per-sample CFG and the guidance switches ----------------------------------------------------
def test_per_sample_guidance_equals_each_samples_own_scale():
    teacher = tiny_pixel_teacher()
    x, t, cond = torch.randn(4, 1, 8, 8), torch.full((4,), 600), teacher.encode([1, 2, 3, 4])
    w = torch.tensor([1.0, 2.0, 4.5, 7.0])
    with torch.no_grad():
        together = teacher.guided_output(x, t, cond, w)
        for i in range(4):
            alone = teacher.guided_output(x[i : i + 1], t[i : i + 1], cond.index(slice(i, i + 1)), float(w[i]))
            torch.testing.assert_close(together[i : i + 1], alone, atol=1e-6, rtol=0)
        assert (together[0] - teacher.guided_output(x, t, cond, 4.5)[0]).abs().max() > 1e-4


def test_guidance_modes_feed_each_branch_its_scale(tmp_path, monkeypatch):
    """plain: real w = teacher.guidance_scale, fake w = fake_scale, fake trained unguided; lsg:
    the fake score's own denoising loss on its CFG output at kappa_1; snoopi: one draw per sample
    in the range, the same tensor for the real and the fake branch."""
    calls = []
    forward = FakeScore.forward

    def spy(self, x_t, t, cond, guidance_scale=1.0):
        calls.append(("fake", torch.is_grad_enabled(), guidance_scale))
        return forward(self, x_t, t, cond, guidance_scale)

    monkeypatch.setattr(FakeScore, "forward", spy)
    real = FakeScore.real_score

    def real_spy(self, x_t, t, cond, guidance_scale, output="x0", grad=False):
        calls.append(("real", grad, guidance_scale))
        return real(self, x_t, t, cond, guidance_scale, output=output, grad=grad)

    monkeypatch.setattr(FakeScore, "real_score", real_spy)

    def scales(method, **sections):
        calls.clear()
        m = make(method, teacher={"guidance_scale": sections.pop("w_real", 1.0)}, **sections)
        trainer_for(m, tmp_path, f"{method}{len(list(tmp_path.iterdir()))}").train_step(0)
        return list(calls)

    # VSD, plain: real 3, fake 1.5 in the generator loss; the fake score's update unguided
    got = scales("vsd", w_real=3.0, guidance={"fake_scale": 1.5})
    assert [(c[0], c[2]) for c in got] == [("real", 3.0), ("fake", 1.5), ("fake", 1.0)]
    # SiD, lsg: gradients through both branches in the generator loss; kappa_1 = 2 in the fake update
    got = scales("sid", w_real=1.5, guidance={"mode": "lsg", "fake_scale": 1.5, "fake_train_scale": 2.0})
    assert [(c[0], c[2]) for c in got] == [("real", 1.5), ("fake", 1.5), ("fake", 2.0)]
    assert got[0][1] and got[1][1]  # SiD differentiates through the real and the fake branch
    # snoopi: per-sample scales in [2, 6], shared by both branches
    got = scales("vsd", guidance={"mode": "snoopi", "scale_range": [2.0, 6.0]})
    w_real, w_fake = got[0][2], got[1][2]
    assert torch.is_tensor(w_real) and w_real.shape == (8,) and torch.equal(w_real, w_fake)
    assert bool((w_real >= 2).all() and (w_real <= 6).all()) and w_real.std() > 0.1
    assert got[2][2] == 1.0


def test_lsg_short_guidance_trains_the_fake_scores_cfg_output():
    """denoising_loss at kappa_1 = || uncond + kappa_1 (cond - uncond) - target ||^2 per sample."""
    teacher = tiny_pixel_teacher()
    fake = make("vsd", model=teacher).fake_score
    x0, eps, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([100, 300, 600, 900])
    cond = teacher.encode([0, 3, 5, 9])
    with torch.no_grad():
        got = denoising_loss(fake, teacher.schedule, teacher.prediction_type, x0, eps, t, cond, guidance_scale=2.0)
        x_t = teacher.schedule.add_noise(x0, eps, t)
        u = fake.network(x_t, t, class_labels=cond.uncond["class_labels"]).sample
        c = fake.network(x_t, t, class_labels=cond.cond["class_labels"]).sample
        target = teacher.schedule.from_x0_eps(x0, eps, t, "v_prediction")
        expected = (u + 2.0 * (c - u) - target).pow(2).flatten(1).mean(dim=1)
        unguided = denoising_loss(fake, teacher.schedule, teacher.prediction_type, x0, eps, t, cond)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(unguided, (c - target).pow(2).flatten(1).mean(dim=1), atol=1e-6, rtol=1e-5)
    dropped = drop_conditions(cond, torch.tensor([True, False, True, False]))
    assert dropped.cond["class_labels"].tolist() == [10, 3, 10, 9] and cond.cond["class_labels"].tolist() == [0, 3, 5, 9]


# -- the generator losses --------------------------------------------------------------------------
def test_vsd_gradient_vanishes_when_both_branches_agree_and_sds_is_sigma2_eps_difference(tmp_path):
    """At initialisation the fake score IS the teacher: VSD's gradient is exactly 0 when both
    branches use the same CFG (1/1 and 3/3), and not when they differ (3/1). SDS's gradient in x is
    sigma_t^2 (eps_real - eps) (over the sample's pixel count)."""
    norms = {}
    for w_real, w_fake in ((1.0, 1.0), (3.0, 3.0), (3.0, 1.0)):
        m = make("vsd", teacher={"guidance_scale": w_real}, guidance={"fake_scale": w_fake})
        norms[(w_real, w_fake)] = trainer_for(m, tmp_path, f"vsd{w_real}{w_fake}").train_step(0)["generator/grad_norm"]
    assert norms[(1.0, 1.0)] == 0.0 and norms[(3.0, 3.0)] == 0.0 and norms[(3.0, 1.0)] > 1e-3

    m = make("sds", teacher={"guidance_scale": 2.0})
    ctx = StepContext(trainer_for(m, tmp_path, "sds"), 0, 0)
    cond, x = batch(m, ctx)
    t, eps = torch.tensor([50, 200, 400, 500, 600, 700, 800, 950]), torch.randn_like(x)
    loss, keep, _ = m.sds_vsd_loss(ctx, x, eps, t, cond, 2.0, 1.0)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    with torch.no_grad():
        eps_real = m.teacher.predict(m.schedule.add_noise(x, eps, t), t, cond, guidance_scale=2.0, output="epsilon")
        sigma = m.schedule.alpha_sigma(t)[1].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(grad, sigma**2 * (eps_real - eps) / 64, atol=1e-7, rtol=1e-4)
    assert keep.all()


def test_sid_loss_is_the_score_identity_formula_through_both_networks(tmp_path):
    """SiD's loss equals (r - f) . ((r - x) - alpha (r - f)) / mean|x - r| per sample; it and its
    gradient vanish while fake = teacher; its gradient flows through the networks (it differs from
    the same expression with both predictions detached)."""
    m = make("sid", score_distillation={"alpha": 1.2})
    trainer = trainer_for(m, tmp_path)
    ctx = StepContext(trainer, 0, 0)
    cond, x = batch(m, ctx)
    t, eps = m.score_timesteps(ctx), torch.randn_like(x)
    loss, keep, _ = m.sid_loss(ctx, x, eps, t, cond, 1.0, 1.0)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert keep.all() and loss.abs().max() < 1e-6 and grad.abs().max() < 1e-6  # fake score = teacher

    for step in range(3):  # the fake score moves away from the teacher
        trainer.train_step(step)
    x_t = m.schedule.add_noise(x, eps, t)
    loss, keep, _ = m.sid_loss(ctx, x, eps, t, cond, 1.0, 1.0)
    (grad,) = torch.autograd.grad(loss.sum(), x, retain_graph=True)
    r = m.real_score(x_t, t, cond, 1.0, output="sample", grad=True)
    f = m.fake_prediction(ctx, x_t, t, cond, 1.0, output="sample", grad=True)
    norm = (x - r).abs().flatten(1).mean(dim=1).detach()
    expected = ((r - f) * ((r - x) - 1.2 * (r - f))).flatten(1).mean(dim=1) / norm
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-4)
    rd, fd = r.detach(), f.detach()
    (stopped,) = torch.autograd.grad((((rd - fd) * ((rd - x) - 1.2 * (rd - fd))).flatten(1).mean(dim=1) / norm).sum(), x)
    assert grad.abs().max() > 1e-6 and (grad - stopped).abs().max() > 1e-3 * grad.abs().max()


def test_sid_time_range_is_the_papers_edm_sigma_range(tmp_path):
    """Generator: u ~ U[0, 0.8] on EDM's Karras grid; fake score (``edm``): ln sigma ~ N(-1.2, 1.2^2)."""
    m = make("sid", score_distillation={"timesteps": "sid", "sid_tmax": 800, "fake_score_timesteps": "edm"}, training={"batch_size": 4000})
    ctx = StepContext(trainer_for(m, tmp_path), 0, 0)
    a, s = m.schedule.alpha_sigma(m.fake_score_timesteps(ctx))
    assert abs(float((s / a).log().median()) + 1.2) < 0.05 and abs(float((s / a).log().std()) - 1.2) < 0.05
    t = m.score_timesteps(ctx)
    a, s = m.schedule.alpha_sigma(t)
    level = s / a
    top = (80 ** (1 / 7) + 0.2 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # sigma(u = 0.8) = 24.4
    assert t.dtype == torch.long and level.max() <= top * 1.1 and level.min() < 0.01
    # u ~ U[0, 0.8] on the Karras grid: half the draws lie below sigma(0.4)
    median = (80 ** (1 / 7) + 0.6 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert abs(float((level < median).float().mean()) - 0.5) < 0.05
    # the mapping: VP -> the nearest training timestep, flow -> exact
    a, s = m.schedule.alpha_sigma(torch.arange(1000))
    levels = (s / a).double().log()
    targets = torch.tensor([0.05, 1.0, 7.0])
    nearest = (levels[None, :] - targets.double().log()[:, None]).abs().argmin(dim=1)
    assert torch.equal(m.schedule.timestep_for_noise_level(targets), nearest)
    flow = FlowSchedule()
    a, s = flow.alpha_sigma(flow.timestep_for_noise_level(torch.tensor([0.5, 3.0])))
    torch.testing.assert_close(s / a, torch.tensor([0.5, 3.0]))


# -- non-finite guard ----------------------------------------------------------------------------
def test_nonfinite_samples_are_filtered_counted_and_the_run_stops_past_the_limit(tmp_path):
    """Step 1: one NaN sample is dropped (filtered, the update still happens); from step 3 every
    sample is NaN: the trainer skips those steps, counts them and stops past
    training.max_skipped_steps (1 here) with one line."""
    m = make("sid", training={"max_steps": 40, "checkpoint_every": 1000, "max_skipped_steps": 1})
    real = m.real_score
    state = {"step": 0}

    def poisoned(x_t, t, cond, guidance_scale, output="x0", grad=False):
        out = real(x_t, t, cond, guidance_scale, output=output, grad=grad)
        if state["step"] == 1:
            out = torch.cat([out[:1] * float("nan"), out[1:]])
        elif state["step"] >= 3:
            out = out * float("nan")
        return out

    m.real_score = poisoned
    trainer = trainer_for(m, tmp_path)
    logs = []
    with pytest.raises(TrainingDiverged, match=r"step 4: .*2 steps skipped, more than training.max_skipped_steps = 1"):
        for step in range(40):
            state["step"] = step
            logs.append(trainer.train_step(step))
    assert logs[0]["nonfinite/filtered_samples"] == 0 and logs[1]["nonfinite/filtered_samples"] == 1
    assert logs[2]["skipped_steps"] == 0 and logs[3]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.unwrap("student").parameters())  # the filtered sample never reached the weights
    assert all(torch.isfinite(p).all() for p in trainer.unwrap("fake_score").parameters())


# -- SiDA ----------------------------------------------------------------------------------------
def test_sida_discriminator_is_the_fake_scores_encoder_without_parameters(tmp_path):
    """No discriminator role: D is the fake score's mid-block output (forward hook) averaged over
    channels, one logit per location; the critic's GAN term teaches the fake score itself to tell
    all-white "digits" from G's samples."""
    m = make("sida", real=white_digits(), adversarial={"critic_weight": 1.0, "generator_weight": 0.0},
             optimizers={"fake_score": {"lr": 3e-3}}, training={"batch_size": 16})
    trainer = trainer_for(m, tmp_path)
    assert set(trainer.prepared) == {"student", "fake_score", "teacher"}
    assert len(m.fake_score.network.mid_block._forward_hooks) == 1 and "forward" not in vars(m.fake_score.network)
    accuracies = []
    for step in range(25):
        logs = trainer.train_step(step)
        accuracies.append((logs["critic/real_accuracy"] + logs["critic/fake_accuracy"]) / 2)
    assert m.fake_score.last_features.shape == (16, 16, 4, 4)  # G's rows x mid-block channels x 4 x 4 (real rows: encode())
    assert sum(accuracies[:3]) / 3 < 0.75 and sum(accuracies[-5:]) / 5 > 0.9
    assert logs["generator/gan_loss"] > 0


# -- recipes and bad input -------------------------------------------------------------------------
SHIPPED = ["digits_sid.yaml", "digits_vsd.yaml", "digits_sds.yaml", "digits_sida.yaml", "shapes_sid.yaml", "sd15_vsd.yaml", "sdxl_vsd.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_validate(name):
    recipe = load_distill_recipe(ROOT / "configs" / name)
    assert isinstance(recipe, ScoreDistillationRecipe) and recipe.method in ("sds", "vsd", "sid", "sida")
    from stepdistill.distillers.score_distillation import check_recipe

    check_recipe(recipe)
    if recipe.method != "sida":
        assert recipe.data.images is None and recipe.data.latents is None  # data-free: nothing read for training
    if name.startswith("digits"):
        assert recipe.evaluation.benchmark == "digits" or recipe.data.images == "digits"


@pytest.mark.parametrize("sections, message", [
    ({"guidance": {"fake_train_scale": 2.0}}, "fake_train_scale is SiD-LSG's kappa_1: set guidance.mode: lsg"),
    ({"guidance": {"scale_range": [2, 4]}}, "scale_range is SNOOPI's per-sample range: set guidance.mode: snoopi"),
    ({"guidance": {"mode": "snoopi"}}, "set guidance.scale_range"),
    ({"guidance": {"mode": "snoopi", "scale_range": [2, 4]}, "teacher": {"guidance_scale": 3.0}}, "leave teacher.guidance_scale"),
    ({"score_distillation": {"min_timestep": 0.9, "max_timestep": 0.1}}, "min_timestep < max_timestep"),
])
def test_bad_guidance_and_timesteps_are_one_line_errors(sections, message):
    with pytest.raises(RecipeError, match=message):
        make("vsd", **sections)


def test_methods_and_data_must_agree():
    with pytest.raises(RecipeError, match="method 'sds' has no fake score"):
        make("sds", guidance={"mode": "lsg"})
    with pytest.raises(RecipeError, match="method 'sida' needs real data"):
        make("sida")
    with pytest.raises(RecipeError, match="discriminator reads the fake score's unguided pass"):
        make("sida", real=white_digits(), guidance={"fake_scale": 2.0})
    with pytest.raises(RecipeError, match="method 'vsd' trains without data images"):
        make("vsd", real=white_digits())
    with pytest.raises(RecipeError, match=r"unknown role\(s\) \['fake_score'\] for method 'sds'"):
        make("sds", optimizers={"fake_score": {"lr": 1e-3}}).roles()


# -- image-free VSD --------------------------------------------------------------------------------
def test_vsd_digits_recipe_never_reads_a_dataset_image(tmp_path, monkeypatch):
    """configs/digits_vsd.yaml for a few steps with every way to a data image made to fail: the
    digits arrays, the data layer's readers and the run's real samples. It trains and exports."""
    import sklearn.datasets

    import stepdistill.data
    import stepdistill.digits.data as digits_data
    from stepdistill.data.base import ImageDataset
    from stepdistill.data.decoded import DecodedImageDataset
    from stepdistill.data.in_memory import TensorImageDataset
    from stepdistill.distillers.run import distill
    from stepdistill.distillers.run_data import RealSamples

    def read(*args, **kwargs):
        raise AssertionError("a dataset image was read")

    for target, name in ((sklearn.datasets, "load_digits"), (digits_data, "_load"), (stepdistill.data, "open_images"),
                         (ImageDataset, "images"), (DecodedImageDataset, "images"), (TensorImageDataset, "images"),
                         (RealSamples, "batch")):
        monkeypatch.setattr(target, name, read)
    short = {"training": {"max_steps": 3, "batch_size": 8, "eval_every": 0, "checkpoint_every": 3}}
    out = distill(ROOT / "configs" / "digits_vsd.yaml", tmp_path / "run", overrides=short, progress=False, evaluate=False, report=False)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(AssertionError, match="a dataset image was read"):  # the patches do bite
        digits_data.load_split("train")


# -- student.init_timestep: G at SiD's sigma_init instead of T - 1 --------------------------------
def test_init_timestep_runs_the_generator_there_and_the_exported_scheduler_agrees():
    """With ``student.init_timestep`` G runs at that timestep (not T - 1), and the exported one-step
    DDIM scheduler, stepped as a stock pipeline steps it, lands exactly on G's x0."""
    from diffusers import DDIMScheduler

    default, moved = make("sid"), make("sid", student={"init_timestep": 600})
    assert default.sampler.timesteps.tolist() == [999]
    assert moved.sampler.timesteps.tolist() == [600]
    noise = torch.randn(6, *moved.shape, generator=torch.Generator().manual_seed(0))
    cond = moved.pool.index(torch.zeros(6, dtype=torch.long))
    with torch.no_grad():
        outputs = {}
        for name, m in (("999", default), ("600", moved)):
            x0 = m.teacher.predict(noise, m.sampler.timesteps.repeat(6), cond, output="x0")
            outputs[name] = x0
            scheduler = DDIMScheduler.from_config(m.scheduler.config)
            scheduler.set_timesteps(1)
            raw = m.teacher.guided_output(noise, scheduler.timesteps.repeat(6), cond, 1.0)
            stepped = scheduler.step(raw, scheduler.timesteps[0], noise).prev_sample
            torch.testing.assert_close(stepped, x0, atol=1e-5, rtol=1e-5)
    assert (outputs["600"] - outputs["999"]).abs().max() > 1e-2  # another timestep, another G
    # The exported schedule is the teacher's cut after 600: the same alpha_bar, and a stock call with
    # more steps stays on it (a one-step "leading" scheduler would index past the schedule).
    scheduler = DDIMScheduler.from_config(moved.scheduler.config)
    teacher_acp = moved.teacher.scheduler.alphas_cumprod
    assert len(scheduler.alphas_cumprod) == 601 and torch.equal(scheduler.alphas_cumprod, teacher_acp[:601])
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist()[0] == 600 and scheduler.timesteps.tolist() == sorted(scheduler.timesteps.tolist(), reverse=True)
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(moved.teacher.guided_output(x, t.repeat(6), cond, 1.0), t, x).prev_sample
    assert torch.isfinite(x).all()


def test_init_timestep_is_refused_where_it_has_no_meaning():
    from stepdistill.sampling import make_student_scheduler

    with pytest.raises(StepdistillError, match="one-step students"):
        make("sid", student={"num_steps": 2, "init_timestep": 600})
    with pytest.raises(StepdistillError, match=r"must lie in \(0, 1000\)"):
        make_student_scheduler(tiny_pixel_teacher().scheduler, 1, 1000)
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(StepdistillError, match="VP"):
        make_student_scheduler(FlowMatchEulerDiscreteScheduler(), 1, 500)
