"""``memory.release_encoders`` in every family that distils a text-conditioned teacher, measured.

What the lever promises (stepdistill/distillers/memory.py): the text encoders and the VAE do
their work once (every caption encoded into the cache) and stay in host memory; the training
device holds the denoiser only. Measured here, not read from a flag: every ``Tensor.to`` whose
target is the training device is recorded (a ``TorchFunctionMode``) from the distiller's setup
(build, the memory levers, the Trainer placing the roles) through one training step, and the
bytes of text-encoder and VAE parameters that were sent there are summed. With the lever that
sum is 0 while the denoiser's bytes did travel (the measurement sees placement); without it,
every text-encoder and VAE byte travelled. On a GPU these are the bytes the accelerator holds.

One case per family and per way the teacher's weights are used: a frozen teacher role (DMD2,
LCM, SiD, SDS, SiDA, guidance, progressive, reflow) and a LoRA trained on the teacher's own
weights (DMD2 / VSD with a LoRA fake score, LCM-LoRA, AGD), on tiny SD 1.x and Flux pipelines.

(The encoders are not freed from host memory: the exported pipeline and the evaluation's
decode use them; the lever is about the accelerator.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from stepdistill.distillers.base import RunData, StagedDistillation
from stepdistill.distillers.memory import apply_memory_levers
from stepdistill.distillers.registry import load_distill_recipe
from stepdistill.distillers.run import build_method
from stepdistill.training import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline  # noqa: E402

CAPTIONS = ["a cat", "a dog", "a red cat", "a cat"]
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")


class DeviceTransfers(TorchFunctionMode):
    """Records the ids of the tensors asked to move to ``device`` (``Tensor.to``, what
    ``Module.to`` calls for every parameter; a no-op move on the same device is recorded too)."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)
        self.moved: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            target = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
            if target is not None and target.type == self.device.type:
                self.moved.add(id(args[0]))
        return func(*args, **kwargs)


def teacher_of(family: str):
    if family == "sd":
        from stepdistill.teachers.stable_diffusion import StableDiffusionTeacher

        return StableDiffusionTeacher.from_pipeline(tiny_sd_pipeline())
    from stepdistill.teachers.flux import FluxTeacher

    return FluxTeacher.from_pipeline(tiny_flux_pipeline())


# (family, method, recipe sections, real latents?, stage index for staged methods)
CASES = {
    "dmd2": ("sd", "dmd2", {"dmd": {"gan_generator_weight": 0.1, "gan_critic_weight": 0.1},
                            "optimizers": {"discriminator": {"lr": 1e-3}, "fake_score": {"lr": 1e-3}}}, True, None),
    "dmd2_lora_fake": ("flux", "dmd2", {"fake_score": {"lora_rank": 2}, "optimizers": {"fake_score": {"lr": 1e-3}}}, False, None),
    "lcm": ("sd", "lcm", {"student": {"num_steps": 2}, "consistency": {"num_solver_steps": 4}}, True, None),
    "lcm_lora": ("sd", "lcm", {"student": {"num_steps": 2, "lora_rank": 2}, "consistency": {"num_solver_steps": 4}, "ema": None}, True, None),
    "sid": ("sd", "sid", {"optimizers": {"fake_score": {"lr": 1e-3}}}, False, None),
    "sds": ("sd", "sds", {}, False, None),
    "sida": ("sd", "sida", {"optimizers": {"fake_score": {"lr": 1e-3}}}, True, None),
    "vsd_lora_fake": ("sd", "vsd", {"fake_score": {"lora_rank": 2}, "optimizers": {"fake_score": {"lr": 1e-3}}}, False, None),
    "guidance": ("sd", "guidance", {"student": {"num_steps": 2}, "guidance": {"w_embedding_dim": 32}}, True, None),
    "agd": ("sd", "agd", {"student": {"num_steps": 2, "lora_rank": 1}, "guidance": {"inputs": "trajectories", "trajectory_steps": [2], "trajectory_bank": 2}}, False, None),
    "progressive": ("sd", "progressive", {"progressive": {"teacher_steps": 2}}, True, 0),
    "reflow": ("flux", "reflow", {"reflow": {"num_pairs": 2, "pair_steps": 2, "num_steps": 2, "distill_pair_steps": 2}}, False, 0),
    "reflow_one_step": ("flux", "reflow", {"reflow": {"num_pairs": 2, "pair_steps": 2, "num_steps": 2, "distill_pair_steps": 2}}, False, 1),
}


def placed_bytes(case: str, release: bool, tmp_path) -> dict[str, int]:
    """Bytes of each teacher part sent to the training device by setup + one training step."""
    family, method_name, sections, real, stage = CASES[case]
    teacher = teacher_of(family)
    recipe = load_distill_recipe({
        "method": method_name, **sections,
        "teacher": {"height": 32, "width": 32, "guidance_scale": 2.0 if method_name != "reflow" else 1.0},
        "student": {"num_steps": 1, **sections.get("student", {})},
        "training": {"max_steps": 1, "batch_size": 2, "checkpoint_every": 100, "mixed_precision": "no"},
        "optimizers": {"student": {"lr": 1e-3}, **sections.get("optimizers", {})},
        "memory": {"release_encoders": release},
    })
    shape = tuple(teacher.sample_shape(32, 32))
    x0 = torch.randn(len(CAPTIONS), *shape, generator=torch.Generator().manual_seed(1)) if real else None
    data = RunData.in_memory(teacher, x0, CAPTIONS if real else None, pool=None if real else sorted(set(CAPTIONS)))
    parts = {name: list(getattr(teacher, name).parameters()) for name in ENCODERS if isinstance(getattr(teacher, name, None), torch.nn.Module)}
    parts["denoiser"] = list(teacher.denoiser.parameters())
    device = torch.device("cpu")
    torch.manual_seed(0)
    with DeviceTransfers(device) as transfers:
        method = build_method(teacher, recipe, data)
        if isinstance(method, StagedDistillation):
            method.run_dir = tmp_path
            method = method.build_stage(stage, None)
        done = apply_memory_levers(method, device)
        assert ("release_encoders" in done) == release
        trainer = Trainer(method, method.recipe.training, tmp_path / "run", log_with=None, progress=False)
        logs = trainer.train_step(0)
    assert logs and all(torch.isfinite(torch.as_tensor(v)).all() for v in logs.values()), logs
    return {name: sum(p.numel() * p.element_size() for p in params if id(p) in transfers.moved) for name, params in parts.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_release_encoders_keeps_text_encoders_and_vae_off_the_training_device(case, tmp_path):
    released = placed_bytes(case, True, tmp_path / "released")
    kept = placed_bytes(case, False, tmp_path / "kept")
    teacher = teacher_of(CASES[case][0])
    total = {name: sum(p.numel() * p.element_size() for p in getattr(teacher, name).parameters())
             for name in ENCODERS if isinstance(getattr(teacher, name, None), torch.nn.Module)}
    assert released["denoiser"] > 0 and kept["denoiser"] > 0  # the recorder sees placement
    assert {name: released[name] for name in total} == {name: 0 for name in total}, released
    assert {name: kept[name] for name in total} == total, kept  # without the lever: all of it on the device


def test_a_family_cannot_place_the_teacher_itself():
    """The base class builds the teacher role: overriding roles() fails when the class is
    defined; a "teacher" role or the teacher's networks in a frozen role of a family's own fail
    when the roles are read."""
    from stepdistill.distillers.base import Distiller
    from stepdistill.training.trainer import Role

    with pytest.raises(TypeError, match="overrides Distiller.roles"):
        class Bypass(Distiller):  # noqa: F841
            def roles(self):
                return {"teacher": Role(self.teacher)}

    class OwnTeacherRole(Distiller):
        def __init__(self, teacher, extra):
            self.teacher, self.extra = teacher, extra
            self.recipe = load_distill_recipe({"method": "sds"})

        def method_roles(self):
            return {"student": Role(torch.nn.Linear(1, 1), optimizer=self.recipe.optimizers.get("student")), **self.extra}

    teacher = teacher_of("sd")
    for extra in ({"teacher": Role(torch.nn.Linear(1, 1))}, {"frozen": Role(teacher)}, {"frozen": Role(teacher.text_encoder)},
                  {"frozen": Role(torch.nn.ModuleList([teacher.vae]))}):
        with pytest.raises(TypeError, match="base class"):
            OwnTeacherRole(teacher, extra).roles()
    assert set(OwnTeacherRole(teacher, {}).roles()) == {"student", "teacher"}
    assert OwnTeacherRole(teacher, {}).roles()["teacher"].module is teacher  # no lever: the whole teacher
