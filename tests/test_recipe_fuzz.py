"""Recipe fuzzing: random edits of every shipped recipe (configs/*.yaml) -- deleted keys, wrong
types, unknown keys, out-of-range numbers, in the file or as ``--set`` items -- through the CLI
give a one-line error with exit status 2 and nothing written, or a valid recipe; never a
traceback.

"Valid" stops where the run would load its teacher (``stepdistill distill``) or its images
(``stepdistill train-teacher``): the recipe passed every check that does not need them. For the
digits recipes, whose teacher and data ship with the package, a second test goes on to build
the teacher, data, method, benchmark and trainer (everything but training) from moderately
edited recipes.

Examples are derandomized (the same in every CI run); set STEPDISTILL_FUZZ_EXAMPLES to explore more.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepdistill.cli import main
from stepdistill.config import load_yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
DIGITS = [p for p in RECIPES if p.name.startswith("digits_") and "method" in load_yaml(p)]
EXAMPLES = int(os.environ.get("STEPDISTILL_FUZZ_EXAMPLES", "0"))
FAST = settings(max_examples=EXAMPLES or 60, deadline=None, derandomize=not EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=EXAMPLES or 6)


class Validated(Exception):
    """Raised where a valid recipe's run would load its teacher / images."""


def stop(*args, **kwargs):
    raise Validated


# -- edits -----------------------------------------------------------------------------------------
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=6),
                    st.sampled_from([0, -1, 1, 0.5, -0.5, 1e-9, 1e9, 2**32, 2**63, "nan", ".inf", "1e-4", "no", "yes", "null"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
NUMBERS = st.one_of(st.integers(-(2**40), 2**40), st.floats(), st.sampled_from([0, -1, 0.0, -0.001, 1.5, 2**32, -(2**31)]))
KEYS = st.one_of(st.text(min_size=1, max_size=8), st.integers(-3, 3), st.sampled_from(["lr", "seed", "max_steps", "method", "teacher"]))


def paths(tree, prefix=()):
    for key, value in tree.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from paths(value, (*prefix, key))


def numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def edits(recipe: dict, small: bool = False):
    """Lists of (kind, path, value, via --set) edits of ``recipe``."""
    all_paths = list(paths(recipe))
    sections = [()] + [p for p in all_paths if isinstance(get(recipe, p), dict)]
    numbers = [p for p in all_paths if numeric(get(recipe, p)) or (isinstance(get(recipe, p), list) and get(recipe, p) and numeric(get(recipe, p)[0]))]
    value = st.integers(-3, 70) | st.floats(-2, 70) if small else VALUES
    number = st.integers(-3, 70) | st.sampled_from([0.0, -0.5, 0.99, 1.0, 1.01]) if small else NUMBERS
    one = st.one_of(
        st.tuples(st.just("delete"), st.sampled_from(all_paths), st.none(), st.just(False)),
        st.tuples(st.just("set"), st.sampled_from(all_paths), value, st.booleans()),
        st.tuples(st.just("unknown"), st.sampled_from(sections), st.tuples(KEYS, value), st.booleans()),
        st.tuples(st.just("range"), st.sampled_from(numbers), number, st.booleans()),
    )
    return st.lists(one, min_size=1, max_size=3)


def apply(recipe: dict, changes) -> tuple[dict, list[str]]:
    """The edited recipe and the ``--set`` items that carry the edits marked for them."""
    recipe, sets = json.loads(json.dumps(recipe)), []
    for kind, path, value, via_set in changes:
        if kind == "unknown":
            key, value = value
            path = (*path, key)
        try:
            node = get(recipe, path[:-1])
        except (KeyError, TypeError):
            continue  # an earlier edit removed or replaced the section
        if not isinstance(node, dict):
            continue
        if kind == "range" and isinstance(node.get(path[-1]), list):
            value = [value] * len(node[path[-1]])
        if via_set and kind != "delete" and all(isinstance(k, str) for k in path):
            sets += ["--set", f"{'.'.join(path)}={json.dumps(value)}"]
        elif kind == "delete":
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return recipe, sets


# -- the check -------------------------------------------------------------------------------------
def check_cli(path: Path, recipe: dict, sets: list[str], stop_at: list[tuple[str, str]]) -> str:
    """Run the CLI on the edited recipe: 'valid', or 'error' after checking the error's form."""
    command = "distill" if "method" in load_yaml(path) else "train-teacher"
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        for module, name in stop_at:
            patch.setattr(module + "." + name, stop)
        edited = Path(tmp) / path.name
        edited.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
        out = Path(tmp) / "out"
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main([command, str(edited), "--output-dir", str(out), *sets])
            except Validated:
                return "valid"
        lines = err.getvalue().strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"stepdistill {command}: error: "), (code, err.getvalue())
        if not (out / "run.json").exists():  # errors before the run starts write nothing
            assert not out.exists(), sorted(p.name for p in out.iterdir())
        return "error"


VALIDATION_ONLY = [("stepdistill.distillers.run", "load_recipe_teacher"), ("stepdistill.data", "open_images")]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_edited_recipes_are_valid_or_one_line_errors(path):
    recipe = load_yaml(path)
    assert check_cli(path, recipe, [], VALIDATION_ONLY) == "valid"  # as shipped

    @FAST
    @given(edits(recipe))
    def edited(changes):
        check_cli(path, *apply(recipe, changes), VALIDATION_ONLY)

    edited()


SMALL_BUILDS = {
    "agd": {"guidance": {"trajectory_bank": 8}},
    "reflow": {"reflow": {"num_pairs": 16, "pair_steps": 2, "distill_pair_steps": 2, "straightness_samples": 4,
                          "straightness_steps": 2, "stage_max_steps": []}},
    "progressive": {"progressive": {"teacher_steps": 4, "stage_max_steps": []}},
}


@pytest.mark.parametrize("path", DIGITS, ids=[p.stem for p in DIGITS])
def test_edited_digits_recipes_build_every_piece_or_fail_in_one_line(path):
    recipe = load_yaml(path)
    small = {"training": {"batch_size": 4, "num_eval_samples": 4}}
    recipe = {**recipe, "training": {**recipe["training"], **small["training"]}}
    if recipe.get("dmd", {}).get("regression_weight"):
        recipe["dmd"] = {**recipe["dmd"], "regression_weight": 0.0}  # its pairs file is made by a run (test_determinism makes one)
    for section, values in SMALL_BUILDS.get(recipe.get("method"), {}).items():  # what a build samples from the teacher, made small
        recipe[section] = {**recipe.get(section, {}), **values}
    build_only = [("stepdistill.training.trainer.Trainer", "train")]
    assert check_cli(path, recipe, [], build_only) == "valid"

    @SLOW
    @given(edits(recipe, small=True))
    def edited(changes):
        check_cli(path, *apply(recipe, changes), build_only)

    edited()
