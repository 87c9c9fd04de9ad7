"""Faults during a DMD2 run with its GAN and EMA (configs/digits_dmd2.yaml cut to 9 steps, periodic
evaluation and checkpoints every 3), through the CLI:

- ``kill -9`` mid-step at a random step between checkpoints, then ``--resume``: the final
  student, fake score, discriminator, EMA, optimizer and LR-schedule states and the exported
  pipeline are bitwise equal to an uninterrupted run's;
- SIGTERM mid-step: a checkpoint at the step boundary, exit 143 with one line, resumable to the
  same bits;
- ``kill -9`` or a crash during export: never a half-written ``pipeline/``; ``--resume`` exports;
- a crash in the final evaluation: the final checkpoint is already written; ``--resume``
  evaluates and exports, no training lost;
- ``--resume`` with a recipe differing in anything but the step budget: refused, keys named.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stepdistill import export
from stepdistill.cli import main
from stepdistill.training import trainer as trainer_module

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
RECIPE = str(ROOT / "configs" / "digits_dmd2.yaml")
STEPS, EVERY = 9, 3
SETS = [f"training.max_steps={STEPS}", "training.batch_size=4", f"training.checkpoint_every={EVERY}", "training.keep_checkpoints=0",
        "training.eval_every=3", "training.num_eval_samples=20", "evaluation.report=false"]
CLI = ["distill", RECIPE, *[arg for s in SETS for arg in ("--set", s)]]
FINAL = f"checkpoint-{STEPS:08d}"
BETWEEN_CHECKPOINTS = [s for s in range(EVERY, STEPS - 1) if (s + 1) % EVERY]  # after the first checkpoint
KILL_STEP, TERM_STEP = random.Random(14).sample(BETWEEN_CHECKPOINTS, 2)  # random, never at a checkpoint boundary


def distill(out: Path, *extra: str) -> int:
    return main([*CLI, "--output-dir", str(out), *extra])


def signalled(signame: str, where: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(TESTS / "fault_run.py"), signame, where, *CLI, "--output-dir", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)


def flatten(value, prefix: str, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(v, f"{prefix}.{k}", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value


def run_state(run: Path) -> dict:
    """Everything in the final checkpoint (roles, EMA, optimizers, LR schedules, trainer state)
    and the exported pipeline's tensors. Not accelerate's copy of the global RNG states: no
    training step draws from them (tests/test_determinism.py checks), and they depend on what a
    process imported first (sklearn's first import draws from Python's `random`)."""
    state: dict = {}
    for path in sorted((run / FINAL).iterdir()):
        if path.name.startswith("random_states_"):
            continue
        if path.suffix == ".safetensors":
            flatten(dict(load_file(str(path))), path.name, state)
        elif path.suffix in (".bin", ".pkl"):  # accelerate's optimizer / LR schedule / RNG states
            flatten(torch.load(path, weights_only=False), path.name, state)
        elif path.suffix == ".json":
            flatten(json.loads(path.read_text()), path.name, state)
    for path in sorted((run / "pipeline").rglob("*.safetensors")):
        flatten(dict(load_file(str(path))), str(path.relative_to(run)), state)
    return state


def same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    return a == b


def assert_same_state(a: dict, b: dict, context: str = "") -> None:
    assert a.keys() == b.keys(), (context, sorted(set(a) ^ set(b))[:10])
    differ = [k for k in a if not same(a[k], b[k])]
    assert not differ, (context, differ[:10])
    assert any(k.startswith("optimizer_2.bin") for k in a) and any(k.startswith("ema_student") for k in a)  # 3 optimizers, the EMA


def curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "minutes"} for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    assert distill(out) == 0
    return out


def test_kill_9_mid_step_then_resume_is_bitwise_the_uninterrupted_run(uninterrupted, tmp_path):
    step = KILL_STEP
    out = tmp_path / "killed"
    killed = signalled("KILL", f"step:{step}", out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / FINAL).exists() and not (out / "pipeline").exists()
    assert distill(out, "--resume") == 0
    assert_same_state(run_state(out), run_state(uninterrupted), f"killed at step {step}")
    assert curve(out) == curve(uninterrupted), f"killed at step {step}"


def test_sigterm_checkpoints_at_the_step_boundary_and_exits_cleanly(uninterrupted, tmp_path):
    step = TERM_STEP
    out = tmp_path / "terminated"
    stopped = signalled("TERM", f"step:{step}", out)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last == f"stepdistill distill: stopped: SIGTERM at step {step + 1}: checkpoint-{step + 1:08d} written in {out}; continue with --resume"
    assert "Traceback" not in stopped.stderr
    state = json.loads((out / f"checkpoint-{step + 1:08d}" / "trainer_state.json").read_text())
    assert state["step"] == step + 1 and not (out / "pipeline").exists()
    assert distill(out, "--resume") == 0
    assert_same_state(run_state(out), run_state(uninterrupted), f"SIGTERM at step {step}")


def test_kill_or_crash_during_export_leaves_no_half_written_pipeline(uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "export"
    killed = signalled("KILL", "export", out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / FINAL).is_dir() and not (out / "pipeline").exists()
    assert list(out.glob(".pipeline.partial-*")), "the kill came before the export's files were written"

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_model_card", disk_full)
    with pytest.raises(OSError, match="disk full"):
        distill(out, "--resume")
    assert not (out / "pipeline").exists() and not list(out.glob(".pipeline.*"))  # the kill's leftover is gone too
    monkeypatch.undo()

    assert distill(out, "--resume") == 0
    assert_same_state(run_state(out), run_state(uninterrupted))
    assert not list(out.glob(".pipeline.*"))


def test_a_crash_in_the_final_evaluation_loses_no_training(uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "evaluation"
    evaluate = trainer_module.Trainer.evaluate

    def crashing(self, step):
        if step == STEPS:
            raise RuntimeError("evaluation crashed")
        return evaluate(self, step)

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", crashing)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        distill(out)
    assert (out / FINAL / "trainer_state.json").is_file() and not (out / "pipeline").exists()
    monkeypatch.undo()

    trained = trainer_module.Trainer.train_step
    monkeypatch.setattr(trainer_module.Trainer, "train_step", lambda self, step: pytest.fail(f"step {step} trained again"))
    assert distill(out, "--resume") == 0
    monkeypatch.setattr(trainer_module.Trainer, "train_step", trained)
    assert_same_state(run_state(out), run_state(uninterrupted))
    assert curve(out) == curve(uninterrupted)  # the final row once, with the uninterrupted run's numbers
    card = (out / "pipeline" / "README.md").read_text()
    assert "fd" in card.lower()  # the export carries the final evaluation


def test_resume_with_a_different_recipe_is_refused_naming_the_keys(uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code = distill(out, "--resume", "--set", "optimizers.student.lr=0.001", "--set", "dmd.gan_critic_weight=0.5")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "differs from the run's in dmd.gan_critic_weight, optimizers.student.lr (only the step budget may change)" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written

    # a run made before a recipe field existed resumes (the field compares by its default) ...
    info = json.loads((out / "run.json").read_text())
    del info["recipe"]["training"]["max_skipped_steps"], info["recipe"]["training"]["deterministic"]
    (out / "run.json").write_text(json.dumps(info))
    # ... and the step budget may change: one more step
    assert distill(out, "--resume", "--set", f"training.max_steps={STEPS + 1}") == 0
    assert json.loads((out / f"checkpoint-{STEPS + 1:08d}" / "trainer_state.json").read_text())["step"] == STEPS + 1
