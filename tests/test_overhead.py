"""`stepdistill bench overhead RECIPE`: every network call of a DMD2 iteration is recorded and
replayed bare (forward, and backward where the iteration backpropagated through it)."""

from __future__ import annotations

import re
from pathlib import Path

from stepdistill.cli import main
from stepdistill.distillers.overhead import bench_overhead

ROOT = Path(__file__).resolve().parent.parent
SETS = ["dmd.critic_updates_per_generator_update=1", "training.batch_size=8"]


def test_a_dmd2_iteration_is_replayed_call_by_call():
    report = bench_overhead(ROOT / "configs" / "digits_dmd2.yaml", set_items=SETS, rounds=1, warmup=0)
    calls = [(name, what.split()[0]) for name, what, _ in report.calls]
    # generator update: student (grad), real score (teacher, no grad, CFG batch), fake score and GAN head
    # under the generator's GAN loss; critic update: fake score on fakes, its encoder alone on reals (replayed
    # to the bottleneck too), the head through it, the head alone
    assert calls == [("student", "fwd+bwd"), ("teacher", "fwd"), ("fake_score", "fwd+bwd"), ("discriminator", "fwd+bwd"),
                     ("fake_score", "fwd+bwd"), ("fake_score", "fwd+bwd"), ("discriminator", "fwd+bwd"), ("discriminator", "fwd+bwd")]
    assert [what.endswith("(to the bottleneck)") for _, what, _ in report.calls] == [False] * 5 + [True] + [False] * 2
    shapes = [re.search(r"\d+(x\d+)+", what).group() for _, what, _ in report.calls]
    assert shapes[0] == "8x1x8x8" and shapes[1] == "16x1x8x8" and shapes[4] == shapes[5] == "8x1x8x8"  # CFG pair; fakes, reals
    assert shapes[6].startswith("16x")  # the head on [fakes; reals] bottleneck features
    assert report.bare > 0 and report.iteration > 0 and set(report.optimizer) == {"student", "fake_score", "discriminator"}
    assert report.ratio == report.iteration / report.bare


def test_bench_overhead_cli(capsys):
    assert main(["bench", "overhead", str(ROOT / "configs" / "digits_dmd2.yaml"), "--rounds", "1", *sum((["--set", s] for s in SETS), [])]) == 0
    out = capsys.readouterr().out
    assert "overhead: iteration / bare forward+backward =" in out and "optimizer step student" in out
    assert main(["bench", "overhead"]) == 2  # a recipe is required


def test_a_staged_method_is_measured_on_its_first_stage():
    """Progressive distillation (a StagedDistillation) through the same bench: its first halving's
    iteration -- the 2N-step teacher's two no-grad steps, then the student's forward + backward."""
    report = bench_overhead(ROOT / "configs" / "digits_progressive.yaml", set_items=["training.batch_size=8"], rounds=1, warmup=0)
    calls = [(name, what.split()[0]) for name, what, _ in report.calls]
    assert calls[-1] == ("student", "fwd+bwd") and calls[:-1] and all(c == ("teacher", "fwd") for c in calls[:-1])
    assert set(report.optimizer) == {"student"} and report.iteration > 0
