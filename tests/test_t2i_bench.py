"""The t2i benchmark: captions, the attribute classifier, the sanity ladder and `bench t2i --json`."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stepdistill.cli import main  # noqa: E402
from stepdistill.errors import StepdistillError  # noqa: E402
from stepdistill.t2i import bench  # noqa: E402
from stepdistill.t2i.classifier import (  # noqa: E402
    CLASSIFIER_WEIGHTS,
    NUM_FEATURES,
    classify,
    classify_features,
    evaluate_classifier,
    feature_module,
    real_images,
)
from stepdistill.t2i.data import (  # noqa: E402
    ATTRIBUTES,
    HELDOUT_PAIRS,
    all_scenes,
    eval_prompts,
    parse_caption,
    scene_for,
)


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    """A random-weight StableDiffusionPipeline making 32x32 images, saved as a directory."""
    from tiny_pipelines import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("tiny_sd") / "pipeline"
    tiny_sd_pipeline().save_pretrained(path)
    return path


# --- captions and splits ----------------------------------------------------------------------


def test_every_scene_caption_parses_back():
    scenes = all_scenes(heldout=None)
    assert len(scenes) == 288 and len(set(s.caption for s in scenes)) == 288
    for scene in scenes:
        assert parse_caption(scene.caption) == scene
        assert {name: values[i] for (name, values), i in zip(ATTRIBUTES.items(), scene.labels().values())} == {
            name: getattr(scene, name) for name in ATTRIBUTES}
    with pytest.raises(StepdistillError, match="not a caption"):
        parse_caption("a small red circle in the middle on a white background")


def test_heldout_pairs_never_appear_in_the_train_or_test_splits():
    # the split's scenes are drawn from the seen combinations only; 3,000 draws show every seen pair
    for split, count in (("train", 3000), ("test", 1000)):
        pairs = {(s.colour, s.shape) for s in (scene_for(0, i, split) for i in range(count))}
        assert not pairs & HELDOUT_PAIRS
        assert len(pairs) == 18 - len(HELDOUT_PAIRS)  # every other pair does appear
    heldout = {(s.colour, s.shape) for s in map(parse_caption, eval_prompts("heldout", 200))}
    assert heldout == set(HELDOUT_PAIRS)
    assert not {(s.colour, s.shape) for s in map(parse_caption, eval_prompts("seen", 500))} & HELDOUT_PAIRS


# --- the classifier ---------------------------------------------------------------------------


def test_shipped_classifier_reads_every_attribute_of_real_images():
    # measured with the shipped weights: 1.0000 for every attribute on 2,000 test and 500
    # held-out images (the held-out (colour, shape) pairs are new to the classifier too)
    accuracy = evaluate_classifier()
    for split in ("test", "heldout"):
        for name in ATTRIBUTES:
            assert accuracy[split][name] >= 0.995, (split, name, accuracy[split])
        assert accuracy[split]["all"] >= 0.99


def test_shipped_weights_are_safetensors_with_their_accuracy():
    from safetensors import safe_open

    with safe_open(str(CLASSIFIER_WEIGHTS), "pt") as f:
        measured = json.loads(f.metadata()["accuracy"])
    assert set(measured) == {"test", "heldout"} and measured["heldout"]["shape"] >= 0.99
    assert CLASSIFIER_WEIGHTS.stat().st_size < 2_000_000


def test_classifier_features_and_predictions_agree():
    images, _ = real_images(20, "test")
    feature = feature_module()
    assert feature.num_features == NUM_FEATURES
    from stepdistill.evaluation.features import extract_features

    features = extract_features(images, feature)
    assert features.shape == (20, NUM_FEATURES)
    direct, via_features = classify(images), classify_features(features)
    assert all(torch.equal(direct[name], via_features[name]) for name in ATTRIBUTES)
    with pytest.raises(StepdistillError, match="3, 32, 32"):
        classify(torch.zeros(2, 1, 32, 32))


# --- the sanity ladder ------------------------------------------------------------------------


def test_ladder_orders_both_metrics():
    rows = {row["label"]: row for row in bench.ladder(400)}
    real = rows["real images, own captions"]
    assert real["prompt_accuracy"] >= 0.99  # the classifier's ceiling
    shuffled = rows["shuffled captions"]
    assert shuffled["prompt_accuracy"] < 0.1  # accuracy collapses ...
    assert shuffled["fd"] == pytest.approx(real["fd"])  # ... FD cannot see captions
    blurs = [rows[f"Gaussian blur radius {r:g}"]["fd"] for r in bench.LADDER_BLUR_RADII]
    assert real["fd"] < blurs[0] < blurs[1]
    assert blurs[1] > 3 * real["fd"]
    permuted = rows["colour channels permuted (R->G->B)"]
    assert permuted["attribute_accuracy"]["colour"] == 0.0 and permuted["attribute_accuracy"]["shape"] >= 0.99
    collapsed = rows["collapsed: one image per prompt"]
    assert collapsed["diversity"] == 0.0 < real["diversity"] and collapsed["recall"] < real["recall"]
    assert "| shuffled captions |" in bench.format_ladder(list(rows.values()))


# --- pipelines, the benchmark and the CLI -----------------------------------------------------


def test_generation_is_seeded_per_sample(tiny_sd_dir):
    pipe = bench.load_t2i_pipeline(tiny_sd_dir)
    prompts = eval_prompts("seen", 6)
    a, speed = bench.generate(pipe, prompts, 1, 1.0, batch_size=6)
    b, _ = bench.generate(pipe, prompts, 1, 1.0, batch_size=4)
    assert a.shape == (6, 3, 32, 32) and a.min() >= -1 and a.max() <= 1 and speed > 0
    assert torch.allclose(a, b, atol=1e-5)  # a sample's noise does not depend on the batch size
    c, _ = bench.generate(pipe, prompts, 1, 1.0, batch_size=6, seed=1)
    assert not torch.allclose(a, c)


def test_teacher_names_resolve_to_their_folders(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "teacher_dir", lambda name: tmp_path / "missing" / name)
    with pytest.raises(StepdistillError, match="t2i-sd.*not installed.*missing"):
        bench.resolve_pipeline_dir("t2i-sd")
    monkeypatch.setattr(bench, "teacher_dir", lambda name: tiny_sd_dir)
    assert bench.resolve_pipeline_dir("t2i-flow") == os.fspath(tiny_sd_dir)
    with pytest.raises(StepdistillError, match="not a registered teacher"):
        bench.resolve_pipeline_dir(tmp_path / "nope")


def test_bench_t2i_json_end_to_end(tiny_sd_dir, capsys, tmp_path):
    argv = ["bench", "t2i", str(tiny_sd_dir), "--steps", "1", "--guidance-scale", "1", "--num-samples", "16",
            "--heldout-samples", "8", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pipeline"] == str(tiny_sd_dir) and result["n"] == 16 and result["heldout_n"] == 8
    assert result["steps"] == 1 and result["guidance_scale"] == 1.0 and len(result["rows"]) == 1
    for key in ("prompt_accuracy", "heldout_prompt_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert set(result["attribute_accuracy"]) == set(ATTRIBUTES) == set(result["heldout_attribute_accuracy"])
    assert result["fd"] > result["noise_floor"]["fd"] > 0  # random weights: far from real images
    assert 0.0 <= result["recall"] <= 1.0 and result["diversity"] > 0 and result["images_per_second"] > 0
    assert result["noise_floor"]["prompt_accuracy"] == 1.0 and result["samples_per_prompt"] == 4

    out = tmp_path / "bench"
    argv = ["bench", "t2i", str(tiny_sd_dir), "--steps", "1", "2", "--guidance-scale", "1", "3", "--num-samples", "8",
            "--heldout-samples", "0", "--output-dir", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert table.startswith("| steps |") and table.count("\n| ") == 4 + 1  # a row per (steps, guidance), the noise floor
    written = json.loads((out / "bench.json").read_text())
    assert [(r["steps"], r["guidance_scale"]) for r in written["rows"]] == [(1, 1.0), (1, 3.0), (2, 1.0), (2, 3.0)]
    assert "fd" not in bench.json_object(written) and written["rows"][0]["heldout_prompt_accuracy"] is None
    assert (out / "samples_steps2_w3.png").exists()


def test_bench_t2i_ladder_cli(capsys):
    assert main(["bench", "t2i", "--ladder", "--num-samples", "40", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 40 and len(result["rows"]) == 3 + len(bench.LADDER_BLUR_RADII) + 2
    assert result["rows"][0]["label"] == "real images, own captions" and result["rows"][0]["prompt_accuracy"] == 1.0


def test_bench_t2i_errors_are_one_line(capsys, tmp_path):
    assert main(["bench", "t2i", str(tmp_path / "nope"), "--json"]) == 2
    assert main(["bench", "t2i"]) == 2
    err = capsys.readouterr().err
    assert "not a registered teacher" in err and "--ladder" in err


def test_data_t2i_writes_the_splits(tmp_path, capsys):
    out = tmp_path / "t2i"
    assert main(["data", "t2i", str(out), "--train-images", "3", "--test-images", "2", "--heldout-images", "1"]) == 0
    for split, count in (("train", 3), ("test", 2), ("heldout", 1)):
        lines = (out / split / "metadata.jsonl").read_text().splitlines()
        assert len(lines) == count and all(parse_caption(json.loads(line)["text"]) for line in lines)
    assert main(["data", "t2i", str(out), "--train-images", "3"]) == 2  # not empty: needs --overwrite


def test_plugin_registers_feature_space_dataset_and_teachers():
    import stepdistill.t2i.plugin as plugin
    from stepdistill.data.registry import dataset_factory
    from stepdistill.evaluation.feature_spaces import get_feature_space
    from stepdistill.teachers import TEACHER_NAMES

    network, description = get_feature_space("t2i")
    assert network.num_features == NUM_FEATURES and "t2i" in description
    assert dataset_factory("t2i") is plugin.t2i_dataset
    dataset = plugin.t2i_dataset(num_images=4)
    assert dataset.kind == "text" and (dataset.channels, dataset.height, dataset.width) == (3, 32, 32)
    assert set(bench.TEACHERS) <= set(TEACHER_NAMES)


def test_run_benchmark_scores_samples_against_their_prompts_and_reports_next_to_the_teacher(tiny_sd_dir, tmp_path):
    """`data.images: t2i` selects the t2i benchmark: its evaluator reads prompt accuracy (right
    captions 1.0, rotated ones far lower, FD unchanged), its report is `bench t2i` of the student
    at its steps and export guidance next to the teacher's rows at w = 1 and the run's w."""
    from types import SimpleNamespace

    from stepdistill.evaluation.benchmarks import EvaluationSection, benchmark_for
    from stepdistill.t2i.run_benchmark import T2IBenchmark

    section = EvaluationSection(report_samples=8, teacher_steps=[1, 2])
    benchmark = benchmark_for(section, "t2i", str(tiny_sd_dir), 3, (32, 32))
    assert isinstance(benchmark, T2IBenchmark)
    images, scenes = real_images(64, "test")
    captions = [scene.caption for scene in scenes]
    evaluate = benchmark.evaluator()
    right, wrong = evaluate(images, captions), evaluate(images, captions[1:] + captions[:1])
    assert right["prompt_accuracy"] == 1.0 and wrong["prompt_accuracy"] < 0.5
    assert right["fd"] == pytest.approx(wrong["fd"]) and right["colour_accuracy"] == 1.0
    with pytest.raises(StepdistillError):
        evaluate(images, None)

    method = SimpleNamespace(num_steps=1, export_guidance_scale=1.0, recipe=SimpleNamespace(teacher=SimpleNamespace(guidance_scale=3.0)))
    report = benchmark.report(tiny_sd_dir, method, tmp_path / "report", progress=False)
    table = str(report)
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    (card_row,) = report.students["student"]  # what the run writes into the student's model card
    assert card_row["num_samples"] == 8 and card_row["prompt_accuracy"] == written["student"]["rows"][0]["prompt_accuracy"]
    assert card_row["fd"] == written["student"]["rows"][0]["fd"] and "attribute_accuracy_colour" in card_row
    assert [(r["steps"], r["guidance_scale"]) for r in written["student"]["rows"]] == [(1, 1.0)]
    assert [(r["steps"], r["guidance_scale"]) for r in written["teacher"]["rows"]] == [(1, 1.0), (1, 3.0), (2, 1.0), (2, 3.0)]
    assert written["teacher"]["n"] == 8 and written["teacher"]["heldout_n"] == 2
    assert table.startswith("| model | steps |") and table.count("\n| teacher |") == 4 and "\n| student | 1 | 1 |" in table
    assert (tmp_path / "report" / "report.md").read_text() == table + "\n"
