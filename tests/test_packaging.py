"""The wheel ships every package, the custom pipeline and the package data, and an installed
stepdistill (not the source tree) exports directories that load without stepdistill."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
# What a wheel build reads; copied so that building never writes build/ or *.egg-info into the
# checkout (and a stale build/lib there cannot leak deleted files into the wheel).
BUILD_INPUTS = ["pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "stepdistill", "pipelines"]


def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def source_packages() -> set[str]:
    """Dotted names of the folders under stepdistill/ holding Python files, plus pipelines/.

    ``weights/`` is package data: exported pipeline directories there carry a copy of the
    pipeline file (for ``trust_remote_code``) without being packages.
    """
    found = {"stepdistill.pipelines"}
    for py in (REPO / "stepdistill").rglob("*.py"):
        if "__pycache__" not in py.parts and "weights" not in py.relative_to(REPO).parts:
            found.add(".".join(py.parent.relative_to(REPO).parts))
    return found


def wheel_path_of(package: str) -> str:
    return package.replace(".", "/")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.is_file():
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (built,) = dist.glob("stepdistill-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return target


def test_package_list_matches_the_source_tree():
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    found = source_packages()
    assert not found - listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert not listed - found, f"listed in pyproject.toml but not in the source tree: {sorted(listed - found)}"
    missing_init = sorted(p for p in found - {"stepdistill.pipelines"} if not (REPO / wheel_path_of(p) / "__init__.py").is_file())
    assert not missing_init, f"package folders without __init__.py: {missing_init}"


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "stepdistill/pipelines/class_conditional_pipeline.py" in names
    for package in pyproject()["tool"]["setuptools"]["packages"]:
        assert f"{wheel_path_of(package)}/__init__.py" in names, f"{package} is missing from the wheel"
    for py in (REPO / "stepdistill").rglob("*.py"):
        if "__pycache__" not in py.parts:
            assert py.relative_to(REPO).as_posix() in names, f"{py.relative_to(REPO)} is missing from the wheel"
    weights = REPO / "stepdistill" / "digits" / "weights"
    for path in weights.rglob("*") if weights.is_dir() else []:
        if path.is_file():
            assert path.relative_to(REPO).as_posix() in names, f"package data {path.relative_to(REPO)} is missing from the wheel"
    assert not any(name.startswith(("tests/", "pipelines/")) for name in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "stepdistill = stepdistill.cli:main" in entry_points
    assert "[stepdistill.plugins]\ndigits = stepdistill.digits.plugin" in entry_points


def test_installed_wheel_exports_a_pipeline_that_loads_without_stepdistill(installed, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", DIFFUSERS_VERBOSITY="error")

    export = textwrap.dedent(
        f"""
        import torch
        from diffusers import UNet2DModel, DDIMScheduler
        import stepdistill, stepdistill.export
        assert stepdistill.__file__.startswith({str(installed)!r}), stepdistill.__file__
        from stepdistill.export import save_class_conditional_pipeline
        from stepdistill.sampling import make_student_scheduler
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                           layers_per_block=1, norm_num_groups=8, num_class_embeds=11)
        scheduler = make_student_scheduler(DDIMScheduler(prediction_type="v_prediction"), 2)
        save_class_conditional_pipeline(unet, scheduler, "exported", num_inference_steps=2)
        """
    )
    result = subprocess.run([sys.executable, "-c", export], cwd=work, env={**env, "PYTHONPATH": str(installed)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shipped = installed / "stepdistill" / "pipelines" / "class_conditional_pipeline.py"
    assert (work / "exported" / "class_conditional_pipeline.py").read_bytes() == shipped.read_bytes()
    assert shipped.read_bytes() == (REPO / "pipelines" / "class_conditional_pipeline.py").read_bytes()

    load = textwrap.dedent(
        """
        import sys, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained("exported", trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(class_labels=[1, 2], generator=torch.Generator().manual_seed(0), output_type="np").images
        assert images.shape == (2, 8, 8, 1), images.shape
        assert pipe.scheduler.timesteps.tolist() == [999, 499], pipe.scheduler.timesteps
        assert "stepdistill" not in sys.modules
        """
    )
    result = subprocess.run([sys.executable, "-c", load], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
