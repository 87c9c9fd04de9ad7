"""Any teacher, any data: a pixel teacher built and saved with plain diffusers, the user's own
image folder, the generic recipes through the CLI, exports that reload in a fresh process with
stock diffusers, `stepdistill export` for every run kind, and bad input as one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stepdistill.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from fresh_process import run_fresh_python  # noqa: E402
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--set", "training.max_steps=3", "--set", "training.batch_size=4", "--set", "training.eval_every=0",
         "--set", "training.num_eval_samples=4", "--set", "training.checkpoint_every=3", "--set", "evaluation.report=false"]


def write_images(folder: Path, count: int, mode: str = "RGB", size=(24, 20), seed: int = 0) -> Path:
    """``count`` random PNGs (non-square: resized and center-cropped to the teacher's 16x16)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """What a user brings: a DDPMPipeline made and saved with plain diffusers (no stepdistill code),
    and a folder of RGB images of another size, one of them corrupt."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "teacher")
    images = write_images(root / "images", 12)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.fixture(scope="module")
def pixel_runs(user_files, tmp_path_factory):
    """configs/pixel_dmd2.yaml with the GAN on the folder, the same data-free, configs/pixel_lcm.yaml."""
    root = tmp_path_factory.mktemp("runs")
    teacher, images = str(user_files / "teacher"), str(user_files / "images")
    runs = {
        "dmd2_gan": ["configs/pixel_dmd2.yaml", "--set", f"data.images={images}"],
        "dmd2_data_free": ["configs/pixel_dmd2.yaml"],
        "lcm": ["configs/pixel_lcm.yaml", "--set", f"data.images={images}"],
    }
    for name, (recipe, *data) in runs.items():
        code = main(["distill", str(ROOT / recipe), "--output-dir", str(root / name), "--set", f"teacher.path={teacher}", *data, *SHORT])
        assert code == 0, name
    return root


def roles_of(run: Path) -> set[str]:
    state = json.loads((run / "checkpoint-00000003" / "trainer_state.json").read_text())
    return set(state["roles"])


def test_generic_recipes_run_on_a_stock_ddpm_pipeline_and_an_image_folder(pixel_runs, capsys):
    assert roles_of(pixel_runs / "dmd2_gan") == {"student", "fake_score", "discriminator", "teacher"}  # the GAN read the folder
    assert roles_of(pixel_runs / "dmd2_data_free") == {"student", "fake_score", "teacher"}  # no data: no GAN
    index = {name: json.loads((pixel_runs / name / "pipeline" / "model_index.json").read_text()) for name in ("dmd2_gan", "lcm")}
    assert index["dmd2_gan"]["_class_name"] == "DDIMPipeline" and index["dmd2_gan"]["scheduler"][1] == "DDIMScheduler"
    assert index["lcm"]["_class_name"] == "DDPMPipeline" and index["lcm"]["scheduler"][1] == "LCMScheduler"


def test_exports_reload_in_a_fresh_process_equal_to_the_in_memory_student(pixel_runs, tmp_path):
    """The stock pipeline (fresh interpreter, no stepdistill) samples exactly what the run's own
    sampler makes with the trained weights, from the same generator."""
    from stepdistill.distillers.registry import load_distill_recipe
    from stepdistill.distillers.run import build_method, load_recipe_teacher
    from stepdistill.training.checkpoint import latest_checkpoint, load_role_weights

    expected = {}
    for name in ("dmd2_gan", "dmd2_data_free", "lcm"):
        run = pixel_runs / name
        recipe = load_distill_recipe(json.loads((run / "run.json").read_text())["recipe"])
        teacher = load_recipe_teacher(recipe)
        method = build_method(teacher, recipe, None)
        network = load_role_weights(latest_checkpoint(run), "student", method.student, ema=method.export_from_ema)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(2, 3, 16, 16, generator=g)
        x = method.sample(network, noise, teacher.encode(None), generator=g)
        expected[name] = ((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy().tolist(), method.num_steps)
    stdout = run_fresh_python(f"""
        import json, torch
        from diffusers import DiffusionPipeline
        out = {{}}
        for name, steps in {json.dumps({k: v[1] for k, v in expected.items()})}.items():
            pipe = DiffusionPipeline.from_pretrained({str(pixel_runs)!r} + "/" + name + "/pipeline")
            pipe.set_progress_bar_config(disable=True)
            images = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np").images
            out[name] = images.tolist()
        print(json.dumps(out))
    """, cwd=tmp_path)
    theirs = json.loads(stdout.strip().splitlines()[-1])
    for name, (ours, _) in expected.items():
        assert np.abs(np.array(theirs[name]) - np.array(ours)).max() < 1e-5, name


# -- stepdistill export: every run kind ------------------------------------------------------------
def weights(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(directory.rglob("*.safetensors")):
        found.update({f"{path.relative_to(directory)}:{k}": v for k, v in load_file(path).items()})
    return found


@pytest.fixture(scope="module")
def latent_runs(tmp_path_factory):
    """Short DMD2 runs of the shipped SD 1.5 / SDXL / Flux recipes on tiny random pipelines (Flux:
    a LoRA student, exported as a LoRA file) and the digits recipe (class-conditional pixel)."""
    root = tmp_path_factory.mktemp("latent")
    runs = {}
    for family, build, recipe in (("sd", tiny_sd_pipeline, "sd15_dmd2.yaml"), ("sdxl", tiny_sdxl_pipeline, "sdxl_dmd2.yaml"),
                                  ("flux", tiny_flux_pipeline, "flux_dmd2.yaml")):
        build().save_pretrained(root / family)
        args = ["distill", str(ROOT / "configs" / recipe), "--output-dir", str(root / f"{family}_run"), *SHORT,
                "--set", f"teacher.path={root / family}", "--set", "teacher.height=32", "--set", "teacher.width=32",
                "--set", "data.latents=null", "--set", "data.prompts_file=null", "--set", "data.prompts=[a cat, a dog]",
                "--set", "training.batch_size=2", "--set", "training.mixed_precision=no", "--set", "dmd.critic_updates_per_generator_update=2"]
        assert main(args) == 0, family
        runs[family] = root / f"{family}_run"
    digits = ["distill", str(ROOT / "configs" / "digits_dmd2.yaml"), "--output-dir", str(root / "digits_run"), *SHORT]
    assert main(digits) == 0
    runs["pixel_class"] = root / "digits_run"
    return runs


def test_export_rebuilds_every_run_kind_exactly(pixel_runs, latent_runs, tmp_path):
    kinds = {"pixel_unconditional": pixel_runs / "dmd2_gan", "pixel_lcm": pixel_runs / "lcm", **latent_runs}
    for kind, run in kinds.items():
        artefact = run / ("lora" if (run / "lora").is_dir() else "pipeline")
        assert main(["export", str(run), str(tmp_path / kind)]) == 0, kind
        ours, theirs = weights(artefact), weights(tmp_path / kind)
        assert ours.keys() == theirs.keys() and ours, kind
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), kind
    assert (latent_runs["flux"] / "lora" / "pytorch_lora_weights.safetensors").is_file()  # a LoRA student: a LoRA file
    assert json.loads((tmp_path / "pixel_class" / "model_index.json").read_text())["_class_name"][1] == "ClassConditionalPipeline"


# -- bad input: one line, exit status 2, nothing written ------------------------------------------
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(user_files, tmp_path, capsys):
    teacher = str(user_files / "teacher")
    empty = tmp_path / "empty"
    empty.mkdir()
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for i in range(3):
        (unreadable / f"{i}.png").write_text("not an image")
    grey = write_images(tmp_path / "grey", 4, mode="L")
    ve = tmp_path / "ve_teacher"
    import shutil

    shutil.copytree(teacher, ve)
    (ve / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "ScoreSdeVeScheduler"}))  # variance-exploding
    dmd2 = str(ROOT / "configs" / "pixel_dmd2.yaml")
    cases = {
        "empty folder": ([dmd2, "--set", f"teacher.path={teacher}", "--set", f"data.images={empty}"], "holds no"),
        "unreadable files": ([dmd2, "--set", f"teacher.path={teacher}", "--set", f"data.images={unreadable}"], "no readable images"),
        "channel count": ([dmd2, "--set", f"teacher.path={teacher}", "--set", f"data.images={grey}"], "1 channel"),
        "unknown --set key": ([dmd2, "--set", f"teacher.path={teacher}", "--set", "training.max_step=3"], "did you mean 'max_steps'"),
        "wrong --set type": ([dmd2, "--set", f"teacher.path={teacher}", "--set", "training.max_steps=many"], "'training.max_steps' expects int"),
        "scheduler": ([dmd2, "--set", f"teacher.path={ve}"], "ScoreSdeVeScheduler is not supported"),
        "GAN without data": ([dmd2, "--set", f"teacher.path={teacher}", "--set", "dmd.gan=true"], "dmd.gan is true but the recipe names no real data"),
        "no teacher": ([dmd2], "teacher.path is required"),
    }
    for case, (args, message) in cases.items():
        out = tmp_path / "out"
        assert main(["distill", *args, "--output-dir", str(out)]) == 2, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("stepdistill distill: error:"), (case, err)
        assert message in err, (case, err)
        assert not out.exists(), case


# -- train-teacher on any image folder ------------------------------------------------------------
def test_train_teacher_on_a_flat_folder_and_on_class_folders(tmp_path):
    """A flat folder gives an unconditional teacher exported as a stock DDPMPipeline; one sub-folder
    per class gives a class-conditional one (null class for CFG) as a ClassConditionalPipeline."""
    from diffusers import DiffusionPipeline

    flat = write_images(tmp_path / "flat", 8, size=(16, 16))
    classes = tmp_path / "classes"
    for i, name in enumerate(["cat", "dog", "owl"]):
        write_images(classes / name, 3, size=(16, 16), seed=i)
    tiny = ["--set", "unet.block_out_channels=[8, 16]", "--set", "unet.down_block_types=[DownBlock2D, DownBlock2D]",
            "--set", "unet.up_block_types=[UpBlock2D, UpBlock2D]", "--set", "unet.norm_num_groups=4", "--set", "unet.attention_head_dim=8",
            "--set", "training.max_steps=2", "--set", "training.batch_size=4", "--set", "training.eval_every=0",
            "--set", "training.num_eval_samples=4", "--set", "denoising.eval_inference_steps=2", "--set", "evaluation.feature=random-conv"]
    for name, folder in {"flat": flat, "classes": classes}.items():
        code = main(["train-teacher", str(ROOT / "configs" / "shapes_teacher.yaml"), "--output-dir", str(tmp_path / f"{name}_run"),
                     "--set", f"data.images={folder}", *tiny])
        assert code == 0, name
    flat_pipe = DiffusionPipeline.from_pretrained(tmp_path / "flat_run" / "pipeline")
    assert type(flat_pipe).__name__ == "DDPMPipeline" and flat_pipe.unet.config.num_class_embeds is None
    assert flat_pipe(batch_size=2, num_inference_steps=2, output_type="np").images.shape == (2, 16, 16, 3)
    class_pipe = DiffusionPipeline.from_pretrained(tmp_path / "classes_run" / "pipeline", trust_remote_code=True)
    assert type(class_pipe).__name__ == "ClassConditionalPipeline" and class_pipe.unet.config.num_class_embeds == 4  # 3 + null
    assert class_pipe(class_labels=[0, 2], num_inference_steps=2, output_type="np").images.shape == (2, 16, 16, 3)
