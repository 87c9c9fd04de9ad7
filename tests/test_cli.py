"""The command line: help, one-line errors with exit status 2, and the sample command."""

import argparse
import subprocess
import sys

import pytest
from diffusers import DDIMScheduler
from PIL import Image

from tiny_pipelines import tiny_pixel_unet

from stepdistill.cli import build_parser, main
from stepdistill.export import save_class_conditional_pipeline


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command of the CLI, found by walking the argparse parser (so a new one is covered
    the moment it is added): each subcommand, each nested subparser, and each choice of a
    subcommand's positional argument that names a nested command (``bench digits``, ``data shapes``,
    ``features ladder`` ...)."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths += command_paths(sub, (*prefix, name))
        elif not action.option_strings and action.choices and prefix:
            paths += [(*prefix, str(choice)) for choice in action.choices]
    return paths


COMMANDS = command_paths(build_parser())
SUBCOMMANDS = [path[0] for path in COMMANDS if len(path) == 1]


def test_the_walk_finds_every_command():
    assert len(SUBCOMMANDS) >= 12 and {"distill", "plan", "eval", "hybrid"} <= set(SUBCOMMANDS)
    assert {("bench", "digits"), ("bench", "overhead"), ("data", "shapes"), ("features", "ladder")} <= set(COMMANDS)


def test_console_script_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "stepdistill.cli", "--help"], capture_output=True, text=True, check=True).stdout
    missing = [name for name in SUBCOMMANDS if name not in out]
    assert not missing, missing


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_each_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: stepdistill " + path[0]), out[:200]
    assert path[-1] in out and len(out.splitlines()) > 3  # a nested command is named in its parent's help


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    _one_line_error(capsys, ["bench", "digits", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "b")], "does not exist")
    _one_line_error(capsys, ["sample", str(tmp_path), "--output", str(tmp_path / "g.png")], "not a diffusers pipeline directory")
    _one_line_error(capsys, ["train-teacher", str(tmp_path / "missing.yaml"), "--output-dir", str(tmp_path / "r")], "missing.yaml")
    assert not (tmp_path / "b" / "bench.json").exists()


def test_sample_writes_a_grid(tmp_path, capsys):
    unet = tiny_pixel_unet(num_class_embeds=11)
    save_class_conditional_pipeline(unet, DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing"), tmp_path / "pipe")
    out = tmp_path / "grid.png"
    assert main(["sample", str(tmp_path / "pipe"), "--output", str(out), "--num-images", "20", "--steps", "2",
                 "--guidance-scale", "2"]) == 0
    grid = Image.open(out)
    # 10 columns x 2 rows of 8x8 digits with 1-pixel padding, zoomed 4x
    assert grid.size == ((10 * 9 + 1) * 4, (2 * 9 + 1) * 4)


def test_curve_plots_each_runs_fd_against_minutes(tmp_path, capsys):
    import json

    for name, fds in {"a": [30.0, 20.0], "b": [25.0, 12.0, 9.0]}.items():
        (tmp_path / name).mkdir()
        rows = [{"step": 100 * (i + 1), "minutes": 1.5 * (i + 1), "fd": fd} for i, fd in enumerate(fds)]
        (tmp_path / name / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curve.png"
    assert main(["curve", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(out), "--reference", "teacher 10-step=16.5"]) == 0
    assert Image.open(out).size[0] > 300
    linear = Image.open(out).convert("RGB").tobytes()
    assert main(["curve", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(out), "--reference", "teacher 10-step=16.5", "--log"]) == 0
    assert Image.open(out).convert("RGB").tobytes() != linear  # a logarithmic axis draws another picture
    _one_line_error(capsys, ["curve", str(tmp_path), "--output", str(out)], "no curve.jsonl")
    _one_line_error(capsys, ["curve", str(tmp_path / "a"), "--output", str(out), "--reference", "teacher"], "LABEL=VALUE")
