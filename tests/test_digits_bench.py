"""The digits reference benchmark: classifier, FD, noise floor, run_bench."""

import json

import pytest
import torch

from stepdistill.digits.bench import (
    balanced_labels,
    evaluate_samples,
    format_table,
    generate_samples,
    load_pipeline,
    run_bench,
)
from stepdistill.digits.classifier import (
    CLASSIFIER_WEIGHTS,
    DigitsClassifier,
    feature_module,
    load_classifier,
    predict,
    train_classifier,
)
from stepdistill.digits.data import load_split
from stepdistill.errors import StepdistillError
from stepdistill.metrics import frechet_distance, noise_floor


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    """A random-weight class-conditional digits pipeline, as the teacher helper exports it."""
    from diffusers import DDIMScheduler
    from tiny_pipelines import tiny_pixel_unet

    from stepdistill.export import save_class_conditional_pipeline

    unet = tiny_pixel_unet(num_class_embeds=11)
    scheduler = DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing")
    return save_class_conditional_pipeline(unet, scheduler, tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture(scope="module")
def real_digits():
    return load_split("all")


# --- classifier ---------------------------------------------------------------------------


def test_shipped_classifier_is_accurate_on_heldout_digits():
    heldout = load_split("heldout")
    predicted = predict(heldout.images)
    accuracy = (predicted == heldout.labels).float().mean().item()
    assert accuracy >= 0.97
    assert not load_classifier().training


def test_shipped_weights_are_safetensors():
    from safetensors.torch import load_file

    state = load_file(CLASSIFIER_WEIGHTS)
    assert set(state) == set(DigitsClassifier().state_dict())


def test_feature_module_accepts_torchmetrics_inputs(real_digits):
    features = feature_module()
    assert isinstance(features.num_features, int)
    images = real_digits.images[:16]
    as_float = features((images + 1) / 2)
    as_uint8 = features(((images + 1) * 127.5).round().to(torch.uint8))
    assert as_float.shape == (16, features.num_features)
    torch.testing.assert_close(as_float, as_uint8, atol=0.05, rtol=0.05)


def test_train_classifier_learns_and_writes_loadable_weights(tmp_path):
    from stepdistill.digits.classifier import load_classifier_from

    path = tmp_path / "classifier.safetensors"
    model, accuracy = train_classifier(path, seed=1, epochs=2, log=False)
    assert accuracy > 0.5  # chance is 0.1; two epochs already learn most of it
    reloaded = load_classifier_from(path)
    images = load_split("heldout").images
    torch.testing.assert_close(reloaded(images), model(images))


# --- FD and noise floor ---------------------------------------------------------------------


def test_fd_of_real_digits_against_themselves_is_zero(real_digits):
    assert frechet_distance(real_digits.images, real_digits.images, feature_module()) < 1e-3


def test_fd_grows_with_corruption(real_digits):
    features = feature_module()
    images = real_digits.images
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    distances = [frechet_distance(images, (images + s * noise).clamp(-1, 1), features) for s in (0.0, 0.2, 0.5, 1.0)]
    assert distances == sorted(distances) and distances[-1] > distances[1] > 0
    shifted = torch.roll(images, shifts=2, dims=-1)
    assert frechet_distance(images, shifted, features) > 10 * frechet_distance(images, images, features) + 1.0


def test_fd_is_deterministic_and_independent_of_batch_size(real_digits):
    features = feature_module()
    a, b = real_digits.images, real_digits.images.flip(-1)
    first = frechet_distance(a, b, features, batch_size=100)
    assert frechet_distance(a, b, features, batch_size=100) == first
    assert frechet_distance(a, b, features, batch_size=1000) == pytest.approx(first, rel=1e-6)


def test_fd_rejects_bad_input(real_digits):
    with pytest.raises(StepdistillError, match="at least 2"):
        frechet_distance(real_digits.images, real_digits.images[:1], feature_module())
    with pytest.raises(StepdistillError, match="num_features"):
        frechet_distance(real_digits.images, real_digits.images, torch.nn.Flatten())


def test_noise_floor_is_positive_and_below_random_pipeline(real_digits, tiny_pipeline_dir):
    features = feature_module()
    floor = noise_floor(real_digits.images, features, num_samples=500, draws=3, seed=0)
    assert floor["fd"] > 0 and len(floor["draws"]) == 3
    pipe = load_pipeline(tiny_pipeline_dir)
    labels = balanced_labels(500)
    samples, _ = generate_samples(pipe, labels, num_inference_steps=2, batch_size=250)
    assert frechet_distance(real_digits.images, samples, features) > 5 * floor["fd"]


# --- evaluate_samples and run_bench -------------------------------------------------------------


def test_evaluate_samples_scores_real_and_mislabelled_digits(real_digits):
    perfect = evaluate_samples(real_digits.images, real_digits.labels)
    assert perfect["fd"] < 1e-3 and perfect["accuracy"] > 0.97
    wrong = evaluate_samples(real_digits.images, (real_digits.labels + 1) % 10)
    assert wrong["accuracy"] < 0.05
    with pytest.raises(StepdistillError, match="labels"):
        evaluate_samples(real_digits.images, real_digits.labels[:10])
    with pytest.raises(StepdistillError, match=r"\[N, 1, 8, 8\]"):
        evaluate_samples(torch.zeros(4, 3, 8, 8), torch.zeros(4))


def test_generate_samples_is_reproducible_and_independent_of_batch_size(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    labels = balanced_labels(20)
    a, speed = generate_samples(pipe, labels, num_inference_steps=2, guidance_scale=2.0, batch_size=20)
    b, _ = generate_samples(pipe, labels, num_inference_steps=2, guidance_scale=2.0, batch_size=7)
    assert a.shape == (20, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert speed > 0
    c, _ = generate_samples(pipe, labels, num_inference_steps=2, guidance_scale=2.0, batch_size=20, seed=1)
    assert not torch.allclose(a, c)
    stochastic, _ = generate_samples(pipe, labels, num_inference_steps=2, guidance_scale=2.0, batch_size=20, eta=1.0)
    assert not torch.allclose(a, stochastic)  # DDIM eta reaches the scheduler


def test_run_bench_writes_every_configuration(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "bench"
    results = run_bench(
        tiny_pipeline_dir, out, num_samples=40, steps=(1, 2, 4), guidance_scales=(1.0, 2.0), batch_size=16, progress=False
    )
    assert [(r["steps"], r["guidance_scale"]) for r in results["rows"]] == [
        (1, 1.0), (1, 2.0), (2, 1.0), (2, 2.0), (4, 1.0), (4, 2.0)
    ]
    for row in results["rows"]:
        assert row["fd"] > 0 and 0 <= row["accuracy"] <= 1 and row["images_per_second"] > 0
    assert results["noise_floor"]["fd"] > 0 and results["noise_floor"]["num_samples"] == 40
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(results))
    table = (out / "bench.md").read_text()
    assert format_table(results) in table
    assert table.count("\n| ") == 1 + 6 + 1  # header + one row per configuration + noise floor
    assert (out / "samples_steps4_w2.png").exists()
    assert not list(out.glob("*.tmp"))


def test_run_bench_rejects_missing_and_non_pipeline_dirs(tmp_path):
    with pytest.raises(StepdistillError, match="does not exist"):
        run_bench(tmp_path / "nope", num_samples=10, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepdistillError, match="not a diffusers pipeline"):
        run_bench(tmp_path / "empty", num_samples=10, progress=False)
