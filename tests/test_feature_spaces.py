"""Named feature spaces: the registry (entry points included), the random-conv network (fixed
weights, sensitive to noise, blur and mode collapse), the ladder, and `stepdistill eval` on an
unconditional pipeline with a named feature space."""

import json
from importlib.metadata import EntryPoint

import numpy as np
import pytest
import torch
from torch import nn

from stepdistill.cli import main
from stepdistill.errors import StepdistillError
from stepdistill.evaluation import feature_spaces as spaces
from stepdistill.evaluation.feature_spaces import RandomConvFeatures, feature_spaces, get_feature_space, register_feature_space
from stepdistill.evaluation.features import extract_features, feature_fingerprint
from stepdistill.evaluation.ladder import feature_ladder
from stepdistill.shapes import make_shapes, shapes_image

RANDOM_CONV_NAME = "FD_rc: Fréchet distance in random-conv features (not FID)"
# sha256 of RandomConvFeatures' class name, size and weights (the reference-cache key): the
# weights are integers times one correctly-rounded scale, so these are the bits on any machine.
# A change of design changes it: re-measure the numbers in docs/shapes.md, then update it.
RANDOM_CONV_FINGERPRINT = "487e0d5b532304498e3c996bf3b1e364a24dde3c23c76493ab6ddb83f283e49e"


def shapes_tensor(seed: int, num_images: int) -> torch.Tensor:
    pixels = np.stack([np.asarray(shapes_image(seed, i)) for i in range(num_images)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class ToyFeatures(nn.Module):
    """Per-channel mean and std of the pixels."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, images):
        images = images.repeat(1, 3 // images.shape[1], 1, 1) * self.scale
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def register_toy() -> None:
    """What a benchmark's entry point does."""
    register_feature_space("toy", ToyFeatures, "toy: pixel mean and std (a test)")


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test are forgotten after it."""
    monkeypatch.setattr(spaces, "_REGISTRY", dict(spaces._REGISTRY))


# --- random-conv -------------------------------------------------------------------------------


def test_random_conv_weights_are_the_same_bits_in_every_construction():
    first, second = RandomConvFeatures(), RandomConvFeatures()
    assert first.state_dict().keys() == second.state_dict().keys()
    assert all(torch.equal(first.state_dict()[k], second.state_dict()[k]) for k in first.state_dict())
    assert all(t.dtype == torch.float32 for t in first.state_dict().values())
    assert feature_fingerprint(first) == RANDOM_CONV_FINGERPRINT
    assert first.num_features == 224 and not any(p.requires_grad for p in first.parameters())
    images = shapes_tensor(0, 8)
    assert torch.equal(extract_features(images, first), extract_features(images, second))
    grey = images[:, :1]
    assert torch.equal(extract_features(grey, first), extract_features(grey.repeat(1, 3, 1, 1), first))


def test_random_conv_ladder_on_300_shapes_images_is_monotone():
    """Measured with these 300 + 300 images: real 11.56; noise 0.05 13.11, 0.2 60.42; blur 0.5
    13.02, 1 20.41, 2 49.88; colour shift 20.33; 30 distinct images x10 61.21; 1 image 547.67.
    (At N = 300 the finest rungs, noise 0.02 and blur 0.5, are within the sampling noise of the
    real-vs-real FD; docs/shapes.md has the ladder at N = 2000, where they are not.)"""
    rows = feature_ladder(shapes_tensor(0, 300), shapes_tensor(1, 300), "random-conv", noise_sigmas=(0.05, 0.2))
    fd = {(row["corruption"], row["strength"]): row["fd"] for row in rows}
    real = fd[("none", 0.0)]
    assert real * 1.1 < fd[("noise", 0.05)] and fd[("noise", 0.05)] * 3 < fd[("noise", 0.2)]
    assert fd[("blur", 0.5)] * 1.4 < fd[("blur", 1.0)] and fd[("blur", 1.0)] * 2 < fd[("blur", 2.0)]
    assert real * 1.5 < fd[("blur", 1.0)] and real * 1.5 < fd[("colour shift", 0.1)]
    assert real * 4 < fd[("mode collapse", 30.0)] and fd[("mode collapse", 30.0)] * 5 < fd[("mode collapse", 1.0)]
    assert all(row["num_samples"] == 300 and row["num_reference"] == 300 for row in rows)


# --- registry ----------------------------------------------------------------------------------


def test_unknown_feature_space_is_an_error_listing_the_known_ones():
    with pytest.raises(StepdistillError) as info:
        get_feature_space("imagenet-vgg")
    message = str(info.value)
    assert "'imagenet-vgg'" in message and "inception" in message and "random-conv" in message and "digits" in message


def test_built_in_and_benchmark_spaces_are_listed_and_options_are_checked():
    listed = feature_spaces()
    assert listed["random-conv"] == RANDOM_CONV_NAME and "FID" in listed["inception"]
    assert listed["digits"] == "digits classifier penultimate features"  # registered by the digits entry point
    network, name = get_feature_space("random-conv")
    assert isinstance(network, RandomConvFeatures) and name == RANDOM_CONV_NAME
    with pytest.raises(StepdistillError, match="does not take the option"):
        get_feature_space("random-conv", inception_weights="weights.pth")
    with pytest.raises(StepdistillError, match="weights-inception-2015-12-05-6726825d.pth"):
        get_feature_space("inception")
    with pytest.raises(StepdistillError, match="already registered"):
        register_feature_space("random-conv", RandomConvFeatures, "another")


def test_plugins_are_loaded_once_on_a_miss(scratch_registry, monkeypatch):
    """A benchmark's plugin module registers its space when imported, which happens only on a miss."""
    from stepdistill import plugins

    calls = []
    point = EntryPoint(name="toy", value=__name__, group=plugins.GROUP)

    def fake_entry_points(group):
        calls.append(group)
        return [point]

    monkeypatch.setattr(plugins, "entry_points", fake_entry_points)
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins.importlib, "import_module", lambda name: register_toy())
    assert get_feature_space("random-conv")[1] == RANDOM_CONV_NAME and calls == []  # a hit loads nothing
    network, name = get_feature_space("toy")
    assert isinstance(network, ToyFeatures) and name == "toy: pixel mean and std (a test)"
    assert calls == [plugins.GROUP]
    assert "toy" in feature_spaces()  # loading again does not register twice


# --- stepdistill eval with a named feature space -------------------------------------------------


@pytest.fixture(scope="module")
def ddim_and_real(tmp_path_factory):
    """A tiny stock DDIMPipeline making 16x16 RGB images, and 40 real shapes images."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from tiny_pipelines import tiny_pixel_unet

    root = tmp_path_factory.mktemp("uncond")
    DDIMPipeline(unet=tiny_pixel_unet(channels=3, sample_size=16), scheduler=DDIMScheduler()).save_pretrained(root / "ddim")
    return root / "ddim", make_shapes(root / "real", num_images=40)


@pytest.mark.parametrize("feature", ["random-conv", "auto", "toy"])
def test_eval_of_an_unconditional_pipeline_names_its_feature_space(feature, ddim_and_real, scratch_registry, tmp_path, capsys):
    pipeline, real = ddim_and_real
    register_toy()
    out = tmp_path / "eval"
    args = ["eval", str(pipeline), "--output-dir", str(out), "--real-dir", str(real), "--feature", feature,
            "--num-samples", "20", "--steps", "1", "--batch-size", "20", "--kid-subsets", "2", "--latency-batch-size", "2",
            "--reference-cache", str(tmp_path / "cache")]
    assert main(args) == 0
    printed = capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    name = "toy: pixel mean and std (a test)" if feature == "toy" else RANDOM_CONV_NAME
    assert metrics["feature"] == name and f"features: {name}" in printed.out
    assert f"features: {name}" in (out / "metrics.md").read_text()
    row = metrics["rows"][0]
    assert row["fd"] > 0 and row["num_samples"] == 20 and metrics["reference"]["num_images"] == 40
    assert (out / "metrics.json").read_text().replace("(not FID)", "").count("FID") == 0  # never called FID
    assert ("random-conv features (FD_rc, not FID)" in printed.err) == (feature == "auto")


def test_eval_with_an_unknown_feature_space_is_a_one_line_error(ddim_and_real, tmp_path, capsys):
    pipeline, real = ddim_and_real
    out = tmp_path / "eval"
    assert main(["eval", str(pipeline), "--output-dir", str(out), "--real-dir", str(real), "--feature", "vgg", "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("stepdistill eval: error: unknown feature space 'vgg'; known: ")
    assert not (out / "metrics.json").exists()


def test_features_ladder_and_list_cli(tmp_path, capsys):
    a = make_shapes(tmp_path / "a", num_images=30, seed=0)
    b = make_shapes(tmp_path / "b", num_images=20, seed=1)
    assert main(["features", "ladder", str(a), str(b), "--num-samples", "20", "--reference-samples", "30"]) == 0
    out = capsys.readouterr().out
    assert f"features: {RANDOM_CONV_NAME}" in out and "reference: 30 images" in out and ": 20 images of" in out
    for label in ("real vs real", "Gaussian noise sigma 0.2", "Gaussian blur radius 2", "channel 0 + 0.1", "1 image x20"):
        assert f"| {label} |" in out
    assert main(["features", "ladder", str(a), str(b), "--num-samples", "25"]) == 2
    assert "holds 20 images; 25 were asked for" in capsys.readouterr().err
    assert main(["features", "list"]) == 0
    assert f"random-conv: {RANDOM_CONV_NAME}" in capsys.readouterr().out
