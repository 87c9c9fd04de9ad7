"""The recipe's memory: section in every distiller (stepdistill/distillers/memory.py), on tiny
random teachers:

- gradient checkpointing changes no number (a DMD2 step with the GAN head hooked inside a
  checkpointed SD3 block: same losses, same weights after the step);
- teacher_dtype stores frozen weights (teacher, LoRA bases) in bf16 and keeps trained ones fp32,
  and a bf16-autocast step and evaluation run; without mixed precision it is ignored, with a warning;
- release_encoders encodes every caption once and keeps text encoders (and the VAE, without
  per-step image encoding) off the accelerator;
- LCM-LoRA trains a LoRA on the teacher's own weights (no second copy) and the teacher's solver
  step still sees the untouched base;
- the attention switch reaches every network the run builds (the processor class), and every run
  logs the backend;
- the EMA shares frozen parameters instead of copying them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from stepdistill.config import TrainingConfig, from_dict
from stepdistill.distillers.base import RunData
from stepdistill.distillers.distribution_matching import DMDRecipe
from stepdistill.distillers.registry import method_class
from stepdistill.distillers.memory import apply_memory_levers
from stepdistill.errors import RecipeError
from stepdistill.training import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_consistency import consistency, tiny_pixel_teacher  # noqa: E402
from tiny_pipelines import tiny_sd3_pipeline, tiny_sd_pipeline  # noqa: E402

CAPTIONS = ["a cat", "a dog", "a red cat", "a cat"]


def sd3_dmd2(memory=None, training=None, fake_rank=0, student_rank=0, seed=0):
    """DMD2 with the GAN head on a tiny SD3 teacher, real latents with captions in memory."""
    from stepdistill.teachers.sd3 import StableDiffusion3Teacher

    teacher = StableDiffusion3Teacher.from_pipeline(tiny_sd3_pipeline())
    recipe = from_dict(DMDRecipe, {
        "method": "dmd2", "teacher": {"height": 32, "width": 32, "guidance_scale": 2.0},
        "student": {"lora_rank": student_rank}, "fake_score": {"lora_rank": fake_rank},
        "dmd": {"critic_updates_per_generator_update": 1, "gan_generator_weight": 0.1, "gan_critic_weight": 0.1},
        "training": {"max_steps": 1, "batch_size": 2, "checkpoint_every": 100, **(training or {})},
        "optimizers": {"student": {"lr": 1e-3}, "fake_score": {"lr": 1e-3}, "discriminator": {"lr": 1e-3}},
        "memory": memory or {},
    })
    x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    return method_class(recipe.method)(teacher, recipe, RunData.in_memory(teacher, x0, CAPTIONS))


def trainer_for(method, tmp_path, name):
    return Trainer(method, method.recipe.training, tmp_path / name, log_with=None, progress=False)


def test_gradient_checkpointing_changes_no_number(tmp_path):
    results = {}
    for checkpointing in (False, True):
        method = sd3_dmd2({"gradient_checkpointing": checkpointing})
        done = apply_memory_levers(method, "cpu")
        assert ("gradient_checkpointing" in done) == checkpointing
        assert method.student.gradient_checkpointing == checkpointing and method.fake_score.network.gradient_checkpointing == checkpointing
        logs = trainer_for(method, tmp_path, str(checkpointing)).train_step(0)
        results[checkpointing] = (logs, method.student.state_dict(), method.fake_score.state_dict())
    (logs, student, fake), (ck_logs, ck_student, ck_fake) = results[False], results[True]
    assert logs["generator/gan_loss"] > 0 and logs["critic/gan_loss"] > 0  # the hooked bottleneck fed the GAN head
    for key in ("generator/dm_loss", "generator/gan_loss", "critic/denoise_loss", "critic/gan_loss"):
        assert ck_logs[key] == pytest.approx(logs[key], rel=1e-5, abs=1e-7), key
    for before, after in ((student, ck_student), (fake, ck_fake)):
        assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-5


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process: reset it around a bf16 trainer."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_teacher_dtype_keeps_trained_weights_fp32(tmp_path, fresh_accelerate_state):
    unchanged = sd3_dmd2({"teacher_dtype": "bf16"})  # training.mixed_precision: no -> ignored, with a warning
    with pytest.warns(UserWarning, match="memory.teacher_dtype: bf16 is ignored"):
        apply_memory_levers(unchanged, "cpu")
    assert {p.dtype for p in unchanged.teacher.transformer.parameters()} == {torch.float32}
    method = sd3_dmd2({"teacher_dtype": "bf16"}, {"mixed_precision": "bf16"}, fake_rank=4, student_rank=4)
    done = apply_memory_levers(method, "cpu")
    teacher = method.teacher.transformer
    for network in (teacher, method.student):  # the teacher (with the fake score's LoRA) and the student's own base
        frozen = {p.dtype for p in network.parameters() if not p.requires_grad}
        trained = {p.dtype for p in network.parameters() if p.requires_grad}
        assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert done["teacher_dtype"]["bf16"] == sum(p.numel() for n in (teacher, method.student) for p in n.parameters() if not p.requires_grad)
    trainer = trainer_for(method, tmp_path, "bf16")
    logs = trainer.train_step(0)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    images, _ = method.generate_samples(trainer, 4, torch.Generator().manual_seed(0))  # evaluation runs under the same autocast
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()
    # the student's EMA shares its frozen bf16 base instead of copying it
    ema = trainer.emas["student"].module
    shared = [(a, b) for a, b in zip(ema.parameters(), method.student.parameters()) if not b.requires_grad]
    assert shared and all(a is b for a, b in shared)
    assert all(a is not b for a, b in zip(ema.parameters(), method.student.parameters()) if b.requires_grad)


def test_release_encoders_caches_every_caption_and_keeps_encoders_off_the_device(monkeypatch):
    method = sd3_dmd2({"release_encoders": True})
    done = apply_memory_levers(method, "cpu")
    teacher = method.teacher
    assert done["release_encoders"]["cached_prompts"] == len(set(CAPTIONS)) + 1
    on_device = method.teacher_on_device()
    assert set(on_device.keys()) == {"denoiser"} and on_device["denoiser"] is teacher.transformer  # latents: no VAE on the device
    assert method.roles()["teacher"].module is not teacher  # the frozen role holds the denoiser alone
    method.roles()["teacher"].module.to("meta")  # any other device: only the denoiser moves
    assert teacher.transformer.device.type == "meta"
    assert {p.device.type for n in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae") for p in getattr(teacher, n).parameters()} == {"cpu"}

    def no_encoder(prompts):
        raise AssertionError(f"text encoders ran for {prompts}")

    monkeypatch.setattr(teacher, "_encode_text", no_encoder)
    cond = teacher.encode(CAPTIONS)  # every caption the real data holds comes from the cache
    assert cond.cond["encoder_hidden_states"].shape[0] == len(CAPTIONS)


def test_release_encoders_keeps_the_vae_when_images_are_encoded_every_step():
    method = sd3_dmd2({"release_encoders": True})
    method.real.dataset = object()  # as if real images (not cached latents) were VAE-encoded every step
    assert set(method.teacher_on_device().keys()) == {"denoiser", "vae"}


def test_lcm_lora_trains_on_the_teachers_own_weights(tmp_path):
    teacher = tiny_pixel_teacher()
    fresh = tiny_pixel_teacher()
    data, labels = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, torch.arange(32) % 10
    method = consistency(teacher, data, labels, lora_rank=4, lr=1e-2)
    assert method.student is teacher.unet and method.shares_teacher_weights  # no second copy of the network
    assert "teacher" not in method.roles()
    trainer = Trainer(method, TrainingConfig(max_steps=3, batch_size=8, checkpoint_every=100), tmp_path / "run", log_with=None, progress=False)
    trainer.train()
    base = {k.replace(".base_layer", ""): v for k, v in teacher.unet.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], v) for k, v in fresh.unet.state_dict().items())  # the base weights never moved
    lora_b = [p for n, p in teacher.unet.named_parameters() if "lora_B" in n]
    assert max(p.abs().max().item() for p in lora_b) > 0  # the adapter trained
    x_t, t, s = torch.randn(4, 1, 8, 8), torch.full((4,), 500), torch.full((4,), 480)
    cond, w = teacher.encode([1, 2, 3, 4]), torch.ones(4)
    reference = consistency(fresh, data, labels).solver_step(x_t, t, s, fresh.encode([1, 2, 3, 4]), w)
    torch.testing.assert_close(method.solver_step(x_t, t, s, cond, w), reference)  # the teacher is the base, adapter off
    student = method.consistency_fn(method.student, x_t, t, cond, w)
    assert (student - method.consistency_fn(fresh.unet, x_t, t, cond, w)).abs().max() > 1e-4  # the student is base + adapter


# -- attention ---------------------------------------------------------------------------------------
def sd_dmd2():
    from stepdistill.teachers.stable_diffusion import StableDiffusionTeacher

    teacher = StableDiffusionTeacher.from_pipeline(tiny_sd_pipeline())
    recipe = from_dict(DMDRecipe, {"method": "dmd2", "teacher": {"height": 32, "width": 32}})
    return method_class(recipe.method)(teacher, recipe, RunData.in_memory(teacher, pool=CAPTIONS))


def networks(method):
    return [method.teacher.unet, method.student, method.fake_score.network]


def test_attention_switch_reaches_every_network(monkeypatch):
    from diffusers import ModelMixin
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    from stepdistill.attention import processor_classes

    method = sd_dmd2()
    method.recipe.memory.attention = "sdpa"
    assert apply_memory_levers(method, "cpu")["attention"] == "sdpa"
    assert all(processor_classes(n) == {AttnProcessor2_0.__name__} for n in networks(method))

    # Where xformers can run (CUDA + the package), diffusers' switch is applied to every network.
    # Here: pretend it can, with the real processor class diffusers would install.
    monkeypatch.setattr("stepdistill.attention.xformers_usable", lambda device: True)
    monkeypatch.setattr(ModelMixin, "enable_xformers_memory_efficient_attention",
                        lambda self, attention_op=None: self.set_attn_processor(XFormersAttnProcessor()))
    method = sd_dmd2()  # memory.attention: auto
    assert apply_memory_levers(method, "cuda")["attention"] == "xformers"
    assert all(processor_classes(n) == {XFormersAttnProcessor.__name__} for n in networks(method))
    method.recipe.memory.attention = "sdpa"  # and back
    assert apply_memory_levers(method, "cuda")["attention"] == "sdpa"
    assert all(processor_classes(n) == {AttnProcessor2_0.__name__} for n in networks(method))


def test_xformers_where_it_cannot_run_warns_and_uses_sdpa():
    method = sd_dmd2()
    method.recipe.memory.attention = "xformers"
    with pytest.warns(UserWarning, match="xformers requested but it cannot run here"):
        assert apply_memory_levers(method, "cpu")["attention"] == "sdpa"


def test_every_run_logs_its_attention_backend(tmp_path, capsys):
    from stepdistill.cli import main

    root = Path(__file__).resolve().parent.parent
    args = ["distill", str(root / "configs" / "digits_dmd2.yaml"), "--output-dir", str(tmp_path / "run"),
            "--set", "training.max_steps=1", "--set", "training.batch_size=2", "--set", "training.num_eval_samples=4",
            "--set", "training.checkpoint_every=1", "--set", "evaluation.report=false", "--set", "training.eval_every=0"]
    assert main(args) == 0
    assert "stepdistill distill: attention: sdpa" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "run.json").read_text())["memory"]["attention"] == "sdpa"


def test_sharded_training_is_refused_with_one_line(tmp_path, monkeypatch):
    """accelerate FSDP / DeepSpeed: the Trainer refuses before writing anything (on CPU accelerate
    runs an FSDP launch as MULTI_CPU, so the type is patched here)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    method = consistency(tiny_pixel_teacher(), torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8) % 10)
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self, kind=kind: kind))
        with pytest.raises(RecipeError, match=f"accelerate {kind.value} is not supported: the Trainer steps one role at a time"):
            Trainer(method, TrainingConfig(max_steps=1, batch_size=8), tmp_path / "run", log_with=None, progress=False)
        assert not (tmp_path / "run").exists()
