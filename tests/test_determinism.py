"""Same recipe + seed = same student (issue 14), for every registered distiller.

Each registered method (stepdistill.distillers.registry.METHODS, so a new family is covered the
moment it registers) runs its shipped digits recipe (configs/digits_*.yaml) cut to a few steps,
in the variants that build roles differently (GAN head, LoRA fake score, LoRA student,
w-embedding, K-step backward simulation). Two runs in one process, with the global RNGs left in
different states in between, must give bitwise-identical exported weights and final checkpoints
(student, fake score, discriminator, EMA); another seed must give other weights; and no training
step may draw from a global RNG (all training randomness goes through the step context).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from stepdistill.cli import main
from stepdistill.distillers.registry import METHODS
from stepdistill.distillers.run import distill
from stepdistill.training import trainer as trainer_module

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
FEW_STEPS = ["training.max_steps=3", "training.batch_size=4", "training.eval_every=0", "training.num_eval_samples=4",
             "training.checkpoint_every=100", "evaluation.report=false"]

# Variants that build roles differently, by method; a method not listed runs its first shipped
# digits recipe as is (every method must ship one: the digits benchmark is where it is measured).
VARIANTS: dict[str, dict[str, tuple[str, list[str]]]] = {
    "dmd": {"regression": ("digits_dmd2_ablation_dmd.yaml", ["dmd.pair_steps=2"])},
    "dmd2": {
        "gan": ("digits_dmd2.yaml", []),
        "gan_lora_fake_score": ("digits_dmd2.yaml", ["fake_score.lora_rank=2"]),
        "lora_student": ("digits_dmd2.yaml", ["student.lora_rank=2"]),
        "4step_backward_simulation": ("digits_dmd2_4step.yaml", []),
    },
    "lcm": {
        "full": ("digits_lcm.yaml", []),
        "lora_student": ("digits_lcm.yaml", ["student.lora_rank=2"]),
        "w_embedding": ("digits_lcm_w.yaml", []),
    },
    "pcm": {"full": ("digits_pcm.yaml", [])},
    "agd": {"small_bank": ("digits_agd.yaml", ["guidance.trajectory_bank=8"])},  # the bank is sampled from the teacher at the start
    # staged recipes: stage_max_steps overrides training.max_steps, so empty it; fewer stages / pairs
    "progressive": {"two_stages": ("digits_progressive.yaml", ["progressive.stage_max_steps=[]", "progressive.teacher_steps=4"])},
    "reflow": {"few_pairs": ("digits_reflow.yaml", ["reflow.stage_max_steps=[]", "reflow.num_pairs=16", "reflow.pair_steps=2",
                                                     "reflow.distill_pair_steps=2", "reflow.straightness_samples=4",
                                                     "reflow.straightness_steps=2"])},
}


def shipped_digits_recipe(method: str) -> str | None:
    for path in sorted(CONFIGS.glob("digits_*.yaml")):
        recipe = yaml.safe_load(path.read_text())
        if recipe.get("method") == method:
            return path.name
    return None


def variants_of(method: str) -> dict[str, tuple[str, list[str]]]:
    if method in VARIANTS:
        return VARIANTS[method]
    name = shipped_digits_recipe(method)
    return {"shipped": (name, [])} if name else {}


CASES = [pytest.param(m, v, id=f"{m}-{v}") for m in sorted(METHODS) for v in (variants_of(m) or {"missing": None})]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """DMD's regression pairs, made with the CLI (16 pairs, 2 teacher steps)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.safetensors"
    code = main(["distill", str(CONFIGS / "digits_dmd2_ablation_dmd.yaml"), "--make-pairs", "16",
                 "--set", f"dmd.regression_pairs={path}", "--set", "dmd.pair_steps=2"])
    assert code == 0
    return path


@pytest.fixture
def no_global_draws(monkeypatch):
    """Fail a training step that draws from torch's, numpy's or Python's global RNG."""
    original = trainer_module.Trainer.train_step

    def checked(self, step):
        before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
        logs = original(self, step)
        after = torch.get_rng_state(), np.random.get_state()[1], random.getstate()
        assert torch.equal(before[0], after[0]), f"step {step} drew from torch's global RNG: draw through ctx.randn / rand / randint"
        assert np.array_equal(before[1], after[1]) and before[2] == after[2], f"step {step} drew from numpy's / Python's global RNG"
        return logs

    monkeypatch.setattr(trainer_module.Trainer, "train_step", checked)


def scramble_global_rngs(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def run(recipe: str, sets: list[str], out: Path, *extra: str) -> Path:
    distill(CONFIGS / recipe, out, set_items=[*FEW_STEPS, *sets, *extra], progress=False, evaluate=False, report=False)
    return out


def is_artefact(key: str) -> bool:
    """An exported file (``pipeline/...``, ``lora/...``; a staged run's ``stage_NN/pipeline/...``)."""
    return any(part.startswith(("pipeline", "lora")) for part in Path(key.split(":")[0]).parts[:2])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the exported artefact(s) and of the final checkpoint's roles and EMA."""
    out = {}
    files = [p for p in run_dir.rglob("*.safetensors") if "checkpoint-" in p.parent.name or is_artefact(p.relative_to(run_dir).as_posix())]
    for path in sorted(files):
        for key, value in load_file(str(path)).items():
            out[f"{path.relative_to(run_dir)}:{key}"] = value
    assert out, f"nothing exported in {run_dir}"
    return out


def differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [f"{k} (max |diff| {float((a[k].double() - b[k].double()).abs().max()):.3g})" for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("method, variant", CASES)
def test_same_recipe_and_seed_give_bitwise_identical_students(method, variant, pairs, no_global_draws, tmp_path):
    assert variant != "missing", f"method '{method}' has no configs/digits_*.yaml recipe to check determinism with: ship one or add it to VARIANTS"
    recipe, sets = variants_of(method)[variant]
    if method == "dmd":
        sets = [*sets, f"dmd.regression_pairs={pairs}"]
    scramble_global_rngs(1)
    first = weights(run(recipe, sets, tmp_path / "first"))
    scramble_global_rngs(2)
    second = weights(run(recipe, sets, tmp_path / "second"))
    assert not differing(first, second), differing(first, second)[:5]
    if variant == next(iter(variants_of(method))):  # the seed is used: one variant per method
        other = weights(run(recipe, sets, tmp_path / "other_seed", "training.seed=1"))
        exported = [k for k in first if is_artefact(k)]
        assert exported, "no exported weights to compare"
        assert any(not torch.equal(first[k], other[k]) for k in exported), "training.seed=1 exported the same weights as seed 0"


def test_the_deterministic_switch_runs_on_cpu_changes_nothing_there_and_is_restored(tmp_path, monkeypatch):
    """``training.deterministic: true`` (PyTorch's deterministic algorithms, for GPUs) trains on
    CPU -- whose kernels are deterministic already -- to the same bits, and is switched back off."""
    recipe, sets = VARIANTS["dmd2"]["gan"]
    seen = []
    original = trainer_module.Trainer.train_step
    monkeypatch.setattr(trainer_module.Trainer, "train_step",
                        lambda self, step: seen.append(torch.are_deterministic_algorithms_enabled()) or original(self, step))
    plain = weights(run(recipe, sets, tmp_path / "plain"))
    switched = weights(run(recipe, sets, tmp_path / "deterministic", "training.deterministic=true"))
    assert seen == [False] * 3 + [True] * 3
    assert not differing(plain, switched), differing(plain, switched)[:5]
    assert not torch.are_deterministic_algorithms_enabled()
