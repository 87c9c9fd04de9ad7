"""The trainer's fault handling on the tiny two-role method (critic every step, then the generator
on even steps, with an EMA):

- a non-finite loss or gradient skips the rest of the step: the role and every role after it
  keep their weights, optimizer state, LR schedule and EMA; a role that already updated earlier
  in the same step keeps its update (the documented rule); the step is counted, the count is
  checkpointed and resumed, and one more than ``training.max_skipped_steps`` stops the run with
  a one-line error, its last checkpoint intact;
- SIGINT (Ctrl-C) / SIGTERM: the step finishes, a checkpoint is written at its boundary, the run
  stops resumable to the same bits; a second Ctrl-C stops at once;
- on two processes, a NaN loss or a SIGTERM on one process alone: both skip the same step and
  stop at the same boundary (same weights as one process meeting the same faults);
- a real divergence through the CLI (absurd learning rates): one line, exit status 2.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.cli import main
from stepdistill.errors import TrainingDiverged, TrainingInterrupted
from stepdistill.training import Trainer, list_checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_training import RANK_FAULTS, Faulty, final_weights, tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def trainer(out, method=None, **config) -> Trainer:
    return Trainer(method or Faulty(), tiny_config(**config), out, log_with=None, progress=False, resume=True)


def role_state(t: Trainer, role: str) -> dict:
    state = {"weights": copy.deepcopy(t.unwrap(role).state_dict()), "optimizer": copy.deepcopy(t.optimizers[role].state_dict()),
             "lr": copy.deepcopy(t.lr_schedulers[role].state_dict())}
    if role in t.emas:
        state["ema"], state["ema_updates"] = t.emas[role].state_dict(), t.emas[role].num_updates
    return state


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.mark.parametrize("kind, clip", [("loss", 1.0), ("gradient", 1.0), ("gradient", None)])
def test_a_non_finite_first_role_skips_the_whole_step(kind, clip, tmp_path):
    t = trainer(tmp_path / "run", Faulty({2: ("critic", kind)}), max_grad_norm=clip)
    t.train_step(0), t.train_step(1)
    before = {role: role_state(t, role) for role in ("critic", "generator")}
    logs = t.train_step(2)
    assert t._skipping == f"the {kind} of role 'critic' is not finite" and logs["skipped_steps"] == 1 == t.skipped_steps
    for role in ("critic", "generator"):  # weights, Adam moments and step, LR schedule, EMA: untouched
        assert same(role_state(t, role), before[role]), role
    assert all(p.grad is None for role in ("critic", "generator") for p in t.unwrap(role).parameters())
    t.train_step(3)
    assert not same(role_state(t, "critic"), before["critic"]) and t.skipped_steps == 1  # training goes on


def test_a_role_updated_earlier_in_the_step_keeps_its_update(tmp_path):
    t = trainer(tmp_path / "run", Faulty({2: ("generator", "gradient")}))
    t.train_step(0), t.train_step(1)
    before = {role: role_state(t, role) for role in ("critic", "generator")}
    t.train_step(2)
    assert t._skipping == "the gradient of role 'generator' is not finite"
    assert same(role_state(t, "generator"), before["generator"])
    assert not same(role_state(t, "critic")["weights"], before["critic"]["weights"])  # the critic stepped first, with finite values


def test_skipped_steps_are_checkpointed_and_past_the_limit_the_run_stops(tmp_path, uninterrupted_with_one_skip):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as stop:
        trainer(out, Faulty({3: ("critic", "loss"), 4: ("critic", "loss")}), max_skipped_steps=1).train()
    assert str(stop.value) == (f"step 4: the loss of role 'critic' is not finite (2 steps skipped, more than training.max_skipped_steps = 1): "
                               f"stopping; checkpoint-00000004 in {out} is the last good state (lower the learning rates or clip harder "
                               "with training.max_grad_norm, then --resume)")
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert json.loads((out / "checkpoint-00000004" / "trainer_state.json").read_text())["skipped_steps"] == 1
    resumed = trainer(out, Faulty(), max_skipped_steps=1)
    assert resumed.start_step == 4 and resumed.skipped_steps == 1
    resumed.train()
    assert same(final_weights(resumed), uninterrupted_with_one_skip)


@pytest.fixture
def uninterrupted_with_one_skip(tmp_path):
    t = trainer(tmp_path / "reference", Faulty({3: ("critic", "loss")}), max_skipped_steps=1)
    t.train()
    assert t.skipped_steps == 1
    return final_weights(t)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_checkpoints_at_the_step_boundary_and_resumes_to_the_same_bits(signame, tmp_path):
    reference = trainer(tmp_path / "reference")
    reference.train()
    out = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer(out, Faulty({2: (None, signame)})).train()
    assert stop.value.signum == getattr(signal, signame)
    assert str(stop.value) == f"{signame} at step 3: checkpoint-00000003 written in {out}; continue with --resume"
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    resumed = trainer(out)
    assert resumed.start_step == 3
    resumed.train()
    assert same(final_weights(resumed), final_weights(reference))


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        trainer(out, Faulty({2: (None, "SIGINT twice")})).train()
    assert [s for s, _ in list_checkpoints(out)] == [2]


def test_divergence_through_the_cli_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", str(ROOT / "configs" / "digits_dmd2.yaml"), "--output-dir", str(out)]
    for item in ["training.max_steps=20", "training.batch_size=4", "training.eval_every=0", "training.num_eval_samples=4",
                 "training.checkpoint_every=2", "training.max_skipped_steps=2", "evaluation.report=false",
                 "optimizers.student.lr=1e30", "optimizers.fake_score.lr=1e30"]:
        args += ["--set", item]
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("stepdistill distill: error: step ") and "Traceback" not in captured.err, captured.err[-2000:]
    assert "is not finite (3 steps skipped, more than training.max_skipped_steps = 2): stopping;" in err
    assert captured.out.count("step skipped") == 2  # the skips before the limit, one line each
    last = list_checkpoints(out)[-1][1]
    assert f"{last.name} in {out} is the last good state" in err and not (out / "pipeline").exists()


def test_faults_on_one_of_two_processes_are_agreed_by_both(tmp_path):
    reference = trainer(tmp_path / "one", Faulty(RANK_FAULTS))
    with pytest.raises(TrainingInterrupted):
        reference.train()
    assert reference.skipped_steps == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(TESTS / "tiny_training.py"), str(tmp_path / "two"), "faults"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"stopped {int(signal.SIGTERM)} skipped 1") == 2 and "processes 2" in result.stdout, result.stdout
    assert [s for s, _ in list_checkpoints(tmp_path / "two")] == [2, 4]
    two = load_file(str(tmp_path / "two" / "final_weights.safetensors"))
    for key, value in final_weights(reference).items():  # the same mean gradient, summed in another order (as test_trainer's)
        torch.testing.assert_close(two[key], value, atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
