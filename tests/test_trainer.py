"""The shared trainer: resume equality, 2-process equality, atomic checkpoints, EMA, the
output-directory guard, two-time-scale updates and evaluation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from stepdistill.errors import OutputDirError, RecipeError
from stepdistill.training import EMA, Trainer, latest_checkpoint, list_checkpoints
from stepdistill.training import checkpoint as checkpoint_module
from stepdistill.training.trainer import lr_lambda

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_training import TinyTwoRoleMethod, final_weights, tiny_config  # noqa: E402

TESTS = Path(__file__).resolve().parent


def run(out, method=None, config=None, **kwargs) -> Trainer:
    trainer = Trainer(method or TinyTwoRoleMethod(), config or tiny_config(), out, log_with=None, progress=False, **kwargs)
    trainer.train()
    return trainer


def assert_same_weights(a: dict, b: dict, **tol):
    """Bitwise equal unless a tolerance is given (atol, rtol)."""
    assert a.keys() == b.keys()
    tol = tol or {"atol": 0.0, "rtol": 0.0}
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=lambda m: f"{key}: {m}", **tol)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = run(tmp_path_factory.mktemp("full") / "run")
    return final_weights(trainer)


def test_training_changes_weights_and_follows_the_two_time_scale_schedule(tmp_path, uninterrupted):
    method = TinyTwoRoleMethod()
    initial = {f"generator.{k}": v.clone() for k, v in method.generator.state_dict().items()}
    trainer = run(tmp_path / "run", method)
    assert any(not torch.equal(initial[k], uninterrupted[k]) for k in initial)
    # critic every step, generator on even steps only; the frozen role never steps
    assert [s for s, r in method.calls if r == "critic"] == [0, 1, 2, 3, 4, 5]
    assert [s for s, r in method.calls if r == "generator"] == [0, 2, 4]
    adam_steps = lambda role: int(next(iter(trainer.optimizers[role].state.values()))["step"])  # noqa: E731
    assert adam_steps("critic") == 6 and adam_steps("generator") == 3
    assert trainer.emas["generator"].num_updates == 3
    logs = Trainer(TinyTwoRoleMethod(), tiny_config(), tmp_path / "again", log_with=None, progress=False).train_step(0)
    assert logs["lr/generator"] == 0.5e-2 and logs["lr/critic"] == 3e-2  # warm-up 1/2 at step 0; constant
    assert set(logs) == {"critic_loss", "generator_loss", "lr/generator", "lr/critic", "grad_norm/critic", "grad_norm/generator", "skipped_steps"}
    assert "frozen" not in trainer.optimizers and all(not p.requires_grad for p in method.frozen.parameters())
    with pytest.raises(ValueError, match="role 'frozen' has no optimizer"):
        trainer.step_role("frozen", torch.tensor(0.0), last_micro_step=True)


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, uninterrupted):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(out, TinyTwoRoleMethod(fail_at_step=3))
    assert [step for step, _ in list_checkpoints(out)] == [2]
    resumed = Trainer(TinyTwoRoleMethod(), tiny_config(), out, resume=True, log_with=None, progress=False)
    assert resumed.start_step == 2
    resumed.train()
    assert_same_weights(final_weights(resumed), uninterrupted)
    assert [step for step, _ in list_checkpoints(out)] == [4, 6]  # keep_checkpoints=2


def test_failed_save_leaves_previous_checkpoint_and_resume_ignores_the_partial_one(tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    real_save_file = checkpoint_module.save_file

    def failing_save_file(tensors, path, *args, **kwargs):
        if ".checkpoint-00000004.tmp" in str(path):
            raise OSError("disk full")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        run(out)
    monkeypatch.setattr(checkpoint_module, "save_file", real_save_file)

    assert (out / ".checkpoint-00000004.tmp").is_dir()  # the partial save is there ...
    assert not (out / "checkpoint-00000004").exists()
    assert latest_checkpoint(out).name == "checkpoint-00000002"  # ... but never a candidate
    state = json.loads((out / "checkpoint-00000002" / "trainer_state.json").read_text())
    assert state["step"] == 2

    resumed = run(out, resume=True)
    assert not (out / ".checkpoint-00000004.tmp").exists()
    assert_same_weights(final_weights(resumed), uninterrupted)


def test_output_dir_guard(tmp_path):
    out = tmp_path / "run"
    run(out, config=tiny_config(max_steps=2))
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(OutputDirError, match="already holds a run.*--resume.*--overwrite"):
        Trainer(TinyTwoRoleMethod(), tiny_config(), out, log_with=None, progress=False)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # nothing written

    fresh = run(out, config=tiny_config(max_steps=4, checkpoint_every=100), overwrite=True)
    assert fresh.start_step == 0 and [s for s, _ in list_checkpoints(out)] == [4]

    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="other files"):
        Trainer(TinyTwoRoleMethod(), tiny_config(), other, log_with=None, progress=False)
    with pytest.raises(OutputDirError, match="cannot resume"):
        Trainer(TinyTwoRoleMethod(), tiny_config(), other, resume=True, log_with=None, progress=False)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_resume_of_a_finished_run_does_nothing_more(tmp_path, uninterrupted):
    out = tmp_path / "run"
    run(out)
    again = run(out, TinyTwoRoleMethod(), resume=True)
    assert again.start_step == 6
    assert_same_weights(final_weights(again), uninterrupted)


def test_ema_update_rule():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay min(0.99, 1/10) = 0.1: 0.1 * 0 + 0.9 * 1
    torch.testing.assert_close(ema.module.weight, torch.full((2, 2), 0.9))
    ema.update(model)  # decay min(0.99, 2/11)
    expected = 0.9 * 2 / 11 + (1 - 2 / 11)
    torch.testing.assert_close(ema.module.weight, torch.full((2, 2), expected))
    for _ in range(2000):
        ema.update(model)
    assert ema.current_decay() == 0.99
    torch.testing.assert_close(ema.module.weight, torch.ones(2, 2))
    assert not ema.module.weight.requires_grad
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


def test_ema_with_zero_decay_tracks_the_weights_and_load_trained_model(tmp_path):
    out = tmp_path / "run"
    trainer = run(out, TinyTwoRoleMethod(ema_decay=0.0))
    raw = trainer.unwrap("generator").state_dict()
    ema = trainer.emas["generator"].module.state_dict()
    for key in raw:
        torch.testing.assert_close(ema[key], raw[key])

    # a run with a real decay: EMA != raw, and load_trained_model returns each on request
    out2 = tmp_path / "run2"
    trainer = run(out2, TinyTwoRoleMethod(ema_decay=0.9))
    ema_weights = trainer.emas["generator"].module.state_dict()
    raw_weights = trainer.unwrap("generator").state_dict()
    assert not torch.allclose(ema_weights["0.weight"], raw_weights["0.weight"])
    saved_ema = load_file(str(latest_checkpoint(out2) / "ema_generator.safetensors"))
    torch.testing.assert_close(saved_ema["0.weight"], ema_weights["0.weight"])


def test_load_trained_model_rebuilds_config_models(tmp_path):
    from diffusers import UNet2DModel

    from stepdistill.training import Role, TrainingMethod, load_trained_model

    class TinyUNetMethod(TrainingMethod):
        def __init__(self):
            torch.manual_seed(0)
            self.unet = UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                                    down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)

        def roles(self):
            from stepdistill.config import EMAConfig, OptimizerConfig

            return {"unet": Role(self.unet, OptimizerConfig(lr=1e-2), EMAConfig(decay=0.5))}

        def training_step(self, ctx):
            x = ctx.randn(1, 4, 4)
            loss = self.unet(x, ctx.randint(0, 1000), return_dict=True).sample.pow(2).mean()
            ctx.step_role("unet", loss)
            return {"loss": loss}

    trainer = run(tmp_path / "run", TinyUNetMethod(), tiny_config(max_steps=3, batch_size=2))
    for ema in (True, False):
        loaded = load_trained_model(tmp_path / "run", role="unet", ema=ema)
        expected = trainer.emas["unet"].module if ema else trainer.unwrap("unet")
        assert isinstance(loaded, UNet2DModel)
        assert_same_weights(loaded.state_dict(), expected.state_dict())
    with pytest.raises(OutputDirError, match="no role 'student'"):
        load_trained_model(tmp_path / "run", role="student")
    with pytest.raises(OutputDirError, match="no complete checkpoint"):
        load_trained_model(tmp_path / "missing", role="unet")


def test_evaluation_writes_a_grid_and_logs_evaluator_metrics(tmp_path):
    seen = []

    def evaluator(images, labels):
        seen.append((images.shape, labels.tolist()))
        return {"mean": float(images.mean())}

    trainer = run(tmp_path / "run", config=tiny_config(max_steps=4, eval_every=2), evaluators=[evaluator])
    assert (tmp_path / "run" / "samples" / "step_00000002.png").is_file()
    assert (tmp_path / "run" / "samples" / "step_00000004.png").is_file()
    assert len(seen) == 2 and seen[0][0] == (20, 1, 2, 2) and seen[0][1][:11] == list(range(10)) + [0]
    assert set(trainer.last_metrics) == {"eval/mean"}


def test_tensorboard_logs_are_written(tmp_path):
    trainer = Trainer(TinyTwoRoleMethod(), tiny_config(max_steps=2), tmp_path / "run", progress=False)
    trainer.train()
    events = list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events and any(e.stat().st_size > 0 for e in events)


def test_lr_schedule_warmup_then_cosine():
    from stepdistill.config import OptimizerConfig

    f = lr_lambda(OptimizerConfig(warmup_steps=4, lr_scheduler="cosine"), max_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and abs(f(9) - 0.5) < 1e-9 and abs(f(14)) < 1e-9
    g = lr_lambda(OptimizerConfig(warmup_steps=0, lr_scheduler="constant"), max_steps=14)
    assert {g(s) for s in range(20)} == {1.0}


def test_batch_size_must_split_over_accumulation_steps(tmp_path):
    with pytest.raises(RecipeError, match="batch_size \\(9\\) must be divisible"):
        Trainer(TinyTwoRoleMethod(), tiny_config(batch_size=9, gradient_accumulation_steps=2), tmp_path / "r", log_with=None)
    assert not (tmp_path / "r").exists()


def test_gradient_accumulation_runs_and_differs_only_in_random_draws(tmp_path):
    trainer = run(tmp_path / "run", config=tiny_config(gradient_accumulation_steps=2))
    adam_steps = int(next(iter(trainer.optimizers["critic"].state.values()))["step"])
    assert adam_steps == 6  # one optimizer step per global step, not per micro-step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_end_with_the_same_weights_as_one(tmp_path, uninterrupted):
    out = tmp_path / "two"
    # accelerate 1.x: `--cpu` alone starts ONE process (multi-CPU needs mpirun); torchrun-style
    # workers via `--multi_gpu` plus ACCELERATE_USE_CPU give two gloo processes on a CPU machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent), "ACCELERATE_USE_CPU": "true"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(TESTS / "tiny_training.py"), str(out),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes 2" in result.stdout
    two = load_file(str(out / "final_weights.safetensors"))
    assert_same_weights(two, uninterrupted, atol=1e-5, rtol=1e-4)
