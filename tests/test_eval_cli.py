"""``stepdistill eval``: the shipped digits teacher end to end, and bad input as one-line errors
that leave no metrics.json behind."""

import json
import shutil

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


def test_eval_on_the_shipped_digits_teacher_writes_all_four_outputs(tmp_path, capsys):
    teacher = default_teacher_dir()
    if not (teacher / "model_index.json").is_file():
        pytest.skip(f"the digits teacher is not shipped yet at {teacher}")
    local = tmp_path / "teacher"
    shutil.copytree(teacher, local)  # the model card of the copy gets updated, not the shipped one
    out = tmp_path / "eval"
    code = main(["eval", str(local), "--output-dir", str(out), "--num-samples", "100", "--steps", "1", "2",
                 "--batch-size", "100", "--latency-batch-size", "10", "--kid-subsets", "10"])
    assert code == 0
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows"]
    assert [(r["steps"], r["nfe"]) for r in rows] == [(1, 1), (2, 2)]
    assert rows[1]["fd"] < rows[0]["fd"]  # a trained teacher improves with steps
    assert rows[1]["accuracy"] > 0.5
    assert metrics["command"].startswith("stepdistill eval ") and "--num-samples 100" in metrics["command"]
    if (local / "README.md").is_file():
        assert f"{rows[0]['fd']:.4g}" in (local / "README.md").read_text()
    assert "FD" in capsys.readouterr().out


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
