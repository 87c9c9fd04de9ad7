"""Teacher training: the denoising method's targets, train_teacher's exported pipeline, and the
shipped digits teacher."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from torch import nn

from stepdistill.config import OptimizerConfig, TrainingConfig
from stepdistill.data import TensorImageDataset
from stepdistill.training.teacher import train_teacher
from stepdistill.errors import OutputDirError, RecipeError
from stepdistill.schedule import schedule_from_scheduler
from stepdistill.training import Trainer, load_trained_model
from stepdistill.training.denoising import DenoisingMethod

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "digits_teacher.yaml"
SHIPPED = REPO / "stepdistill" / "digits" / "weights" / "teacher"

TINY = {
    "unet": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4},
    "denoising": {"eval_inference_steps": 2},
    "training": {"max_steps": 3, "batch_size": 16, "checkpoint_every": 2, "log_every": 1, "num_eval_samples": 20},
}


class Oracle(nn.Module):
    """Knows the single training image x0, so it can answer exactly in any parameterization."""

    def __init__(self, x0, schedule, prediction_type):
        super().__init__()
        self.x0, self.schedule, self.prediction_type = x0, schedule, prediction_type
        self.dummy = nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(num_class_embeds=None)

    def forward(self, x_t, t, class_labels=None):
        a, s = self.schedule.alpha_sigma(t)
        x0 = self.x0.expand_as(x_t)
        eps = (x_t - a.view(-1, 1, 1, 1) * x0) / s.view(-1, 1, 1, 1)
        out = self.schedule.from_x0_eps(x0, eps, t, self.prediction_type) + 0 * self.dummy
        return SimpleNamespace(sample=out)


@pytest.mark.parametrize("trained_for", ["epsilon", "sample", "v_prediction"])
def test_denoising_target_matches_the_scheduler_prediction_type(tmp_path, trained_for):
    x0 = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    losses = {}
    for answers_in in ["epsilon", "sample", "v_prediction"]:
        scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=trained_for)
        oracle = Oracle(x0, schedule_from_scheduler(scheduler), answers_in)
        method = DenoisingMethod(oracle, scheduler, TensorImageDataset(x0), optimizer=OptimizerConfig(lr=0.0), ema=None)
        config = TrainingConfig(max_steps=1, batch_size=64, checkpoint_every=100)
        trainer = Trainer(method, config, tmp_path / f"{trained_for}-{answers_in}", log_with=None, progress=False)
        losses[answers_in] = trainer.train_step(0)["loss"]
    assert losses[trained_for] < 1e-8
    assert all(v > 1e-2 for k, v in losses.items() if k != trained_for)


def test_label_dropout_uses_the_null_class(tmp_path):
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
            self.config = SimpleNamespace(num_class_embeds=11)

        def forward(self, x_t, t, class_labels=None):
            seen.append(class_labels.clone())
            return SimpleNamespace(sample=x_t * self.w)

    images, labels = torch.zeros(100, 1, 8, 8), torch.arange(100) % 10
    dataset = TensorImageDataset(images, labels=labels, class_names=[str(i) for i in range(10)])
    method = DenoisingMethod(Recorder(), DDIMScheduler(prediction_type="v_prediction"), dataset,
                             optimizer=OptimizerConfig(), ema=None, label_dropout=0.25)  # fmt: skip
    trainer = Trainer(method, TrainingConfig(max_steps=1, batch_size=1000), tmp_path / "r", log_with=None, progress=False)
    trainer.train_step(0)
    dropped = (seen[0] == 10).float().mean().item()
    assert 0.2 < dropped < 0.3 and seen[0].max() == 10


def test_train_teacher_writes_a_loadable_pipeline_and_resumes(tmp_path):
    out = tmp_path / "teacher"
    pipeline_dir = train_teacher(RECIPE, out, overrides=TINY, progress=False)
    assert pipeline_dir == out / "pipeline"
    assert (pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "samples" / "step_00000003.png").is_file()

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, trust_remote_code=True)
    assert type(pipe).__name__ == "ClassConditionalPipeline"
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction" and config.timestep_spacing == "trailing"
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]  # a one-step student starts at t=999
    # the exported UNet is the run's EMA
    ema = load_trained_model(out, role="unet", ema=True)
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(pipe.unet.state_dict()[key], value)
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()

    with pytest.raises(OutputDirError):
        train_teacher(RECIPE, out, overrides=TINY, progress=False)
    longer = {**TINY, "training": {**TINY["training"], "max_steps": 4}}
    train_teacher(RECIPE, out, resume=True, overrides=longer, progress=False, evaluate=False)
    state = json.loads((out / "checkpoint-00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_train_teacher_rejects_a_bad_recipe_before_writing(tmp_path):
    with pytest.raises(RecipeError, match="unknown key 'warmup_step'.*did you mean 'warmup_steps'"):
        train_teacher(RECIPE, tmp_path / "out", overrides={"optimizer": {"warmup_step": 1}})
    with pytest.raises(RecipeError, match="divisible by norm_num_groups"):
        train_teacher(RECIPE, tmp_path / "out", overrides={"unet": {"block_out_channels": [12, 16]}})
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="shipped teacher not built yet")
def test_shipped_teacher_is_v_prediction_and_draws_recognizable_digits():
    from stepdistill.digits.bench import evaluate_samples

    pipe = DiffusionPipeline.from_pretrained(SHIPPED, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert 0.5e6 <= sum(p.numel() for p in pipe.unet.parameters()) <= 1.0e6
    labels = torch.arange(200) % 10
    images = pipe(class_labels=labels.tolist(), num_inference_steps=10, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images * 2 - 1  # fmt: skip
    metrics = evaluate_samples(images, labels)
    assert metrics["accuracy"] >= 0.95, metrics


def test_interrupted_digits_run_resumes_to_the_same_weights(tmp_path):
    constant = {**TINY, "optimizer": {"lr_scheduler": "constant", "warmup_steps": 0}, "ema": {"decay": 0.5}}
    full = {**constant, "training": {**TINY["training"], "max_steps": 4}}
    short = {**constant, "training": {**TINY["training"], "max_steps": 2}}
    train_teacher(RECIPE, tmp_path / "full", overrides=full, progress=False, evaluate=False)
    train_teacher(RECIPE, tmp_path / "split", overrides=short, progress=False, evaluate=False)
    train_teacher(RECIPE, tmp_path / "split", resume=True, overrides=full, progress=False, evaluate=False)
    for ema in (True, False):
        a = load_trained_model(tmp_path / "full", "unet", ema=ema).state_dict()
        b = load_trained_model(tmp_path / "split", "unet", ema=ema).state_dict()
        changed = load_trained_model(tmp_path / "split", "unet", checkpoint=tmp_path / "split" / "checkpoint-00000002", ema=ema).state_dict()
        assert any(not torch.equal(a[k], changed[k]) for k in a)  # steps 3-4 did change the weights
        for key in a:
            torch.testing.assert_close(a[key], b[key])
