"""``stepdistill eval``: the shipped digits teacher end to end, and bad input as one-line errors
that leave no metrics.json behind."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stepdistill.cli import main
from stepdistill.digits.bench import default_teacher_dir

OUTPUTS = ("metrics.json", "metrics.md", "samples.png", "plot.png")


def _error_line(capsys) -> str:
    """The error the CLI printed: exactly one 'stepdistill eval: error:' line, the last one."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("stepdistill eval: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def test_eval_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--prompts", "--real-dir", "--steps", "--guidance-scales", "--gammas", "--inception-weights", "--clip-model"):
        assert option in out


def snapshot(directory) -> dict:
    """Every file under ``directory`` (names, bytes) and every folder: what "unchanged" means."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def test_eval_on_the_shipped_digits_teacher_leaves_it_byte_for_byte_unchanged(tmp_path, capsys):
    """The issue's case: `eval --update-model-card` on the teacher inside the installed package
    writes the report to --output-dir and leaves the package's directory alone."""
    teacher = default_teacher_dir()
    if not (teacher / "model_index.json").is_file():
        pytest.skip(f"the digits teacher is not shipped yet at {teacher}")
    before = snapshot(teacher)
    out = tmp_path / "eval"
    code = main(["eval", str(teacher), "--output-dir", str(out), "--num-samples", "100", "--steps", "1", "2",
                 "--batch-size", "100", "--latency-batch-size", "10", "--kid-subsets", "10", "--update-model-card"])
    assert code == 0
    assert snapshot(teacher) == before
    printed = capsys.readouterr().out
    assert f"model card left alone: {teacher}: inside the installed package at" in printed
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows"]
    assert [(r["steps"], r["nfe"]) for r in rows] == [(1, 1), (2, 2)]
    assert rows[1]["fd"] < rows[0]["fd"]  # a trained teacher improves with steps
    assert rows[1]["accuracy"] > 0.5
    assert metrics["command"].startswith("stepdistill eval ") and "--num-samples 100" in metrics["command"]
    assert "--update-model-card" in metrics["command"] and "model card updated" not in printed
    # the table: units in the headers, KID with its std, the process's peak RSS (never 0.0)
    assert all(r["peak_memory_kind"] in ("cpu_peak_rss", "cpu_peak_rss_since_start") and r["peak_memory_mib"] > 50 for r in rows)
    header = printed.splitlines()[0]
    for title in ("FD ↓ (feature units²)", "KID ↓ (mean ± std, raw)", "latency (ms / image)", "peak memory (MiB)"):
        assert title in header
    memory = [line.split("|")[-2].strip() for line in printed.splitlines() if line.startswith("| teacher |")]
    assert len(memory) == 2 and all(float(m) > 50 for m in memory)
    assert f"{rows[0]['kid']:.4g} ± {rows[0]['kid_std']:.4g}" in printed


def test_eval_leaves_its_inputs_unchanged_unless_asked(tmp_path, capsys):
    """A pipeline directory with a model card and a real-image folder: byte for byte the same after
    `eval`; with --update-model-card only the README changes."""
    from diffusers import DDPMScheduler

    from stepdistill.export import save_unconditional_pipeline
    from tiny_pipelines import tiny_pixel_unet

    pipe = save_unconditional_pipeline(tiny_pixel_unet(channels=3, sample_size=8), DDPMScheduler(), tmp_path / "pipe", num_inference_steps=2)
    real = _images(tmp_path / "real", [(8, 8)] * 6)
    args = ["eval", str(pipe), "--real-dir", str(real), "--steps", "2", "--num-samples", "6", "--batch-size", "6",
            "--latency-batch-size", "2", "--kid-subsets", "2", "--reference-cache", str(tmp_path / "cache")]
    inputs = {d: snapshot(d) for d in (pipe, real)}
    assert main(args + ["--output-dir", str(tmp_path / "a")]) == 0
    assert {d: snapshot(d) for d in (pipe, real)} == inputs
    assert "model card" not in capsys.readouterr().out
    assert main(args + ["--output-dir", str(tmp_path / "b"), "--update-model-card"]) == 0
    after = snapshot(pipe)
    assert {k for k in after if after[k] != inputs[pipe].get(k)} == {"README.md"} and after.keys() == inputs[pipe].keys()
    assert snapshot(real) == inputs[real]
    assert f"model card updated: {pipe / 'README.md'}" in capsys.readouterr().out
    card = (pipe / "README.md").read_text()
    assert "--update-model-card" in card and "FD ↓ (feature units²)" in card


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    from tiny_pipelines import tiny_sd_pipeline

    directory = tmp_path_factory.mktemp("sd") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(directory)
    return directory


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\na dog\n")
    return path


def _images(folder, sizes):
    folder.mkdir()
    for i, size in enumerate(sizes):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("case", ["unreadable prompts", "missing prompts", "empty real folder", "mixed sizes", "not a pipeline", "no inception"])
def test_bad_input_is_a_one_line_error_and_writes_no_metrics(case, tiny_sd_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", str(tiny_sd_dir), "--output-dir", str(out), "--steps", "1", "--feature", "digits"]
    if case == "unreadable prompts":
        bad = tmp_path / "prompts.csv"
        bad.write_bytes(b"caption\n\xff\xfe broken bytes\n")
        args += ["--prompts", str(bad), "--real-dir", str(_images(tmp_path / "real", [(32, 32)] * 2))]
        expected = "cannot read prompts file"
    elif case == "missing prompts":
        args += ["--prompts", str(tmp_path / "nope.jsonl")]
        expected = "prompts file not found"
    elif case == "empty real folder":
        (tmp_path / "real").mkdir()
        args += ["--prompts", str(prompts_file), "--real-dir", str(tmp_path / "real")]
        expected = "holds no images"
    elif case == "mixed sizes":
        args += ["--prompts", str(prompts_file), "--real-dir", str(_images(tmp_path / "real", [(32, 32), (32, 32), (64, 32)]))]
        expected = "must all have one size"
    elif case == "not a pipeline":
        not_pipeline = tmp_path / "weights"
        not_pipeline.mkdir()
        (not_pipeline / "model.safetensors").write_bytes(b"\0" * 16)
        args = ["eval", str(not_pipeline), "--output-dir", str(out), "--steps", "1"]
        expected = "is not a diffusers pipeline directory (no model_index.json)"
    else:
        args = ["eval", str(tiny_sd_dir), "--output-dir", str(out), "--steps", "1", "--prompts", str(prompts_file),
                "--real-dir", str(_images(tmp_path / "real", [(32, 32)] * 2)), "--feature", "inception"]
        expected = "weights-inception-2015-12-05-6726825d.pth"
    assert main(args) == 2
    assert expected in _error_line(capsys)
    assert not (out / "metrics.json").exists()
