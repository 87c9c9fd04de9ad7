"""``stepdistill schema``: the JSON Schema (draft 2020-12) of the recipe format, derived from the
dataclasses the validator reads (stepdistill/config.py ``json_schema``). It is a valid 2020-12
schema; every shipped recipe (configs/*.yaml) passes it; a typo'd key, a key of another method's
section, a number out of range and an unknown choice fail it, the error naming the key -- as an
editor checking the YAML would show -- and the validator's own one-line error still names the key
and the nearest valid key; on a few values at every key of one recipe per recipe class the schema
accepts exactly what the validator accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from stepdistill.cli import main
from stepdistill.config import load_yaml, merge
from stepdistill.distillers.registry import load_distill_recipe
from stepdistill.errors import RecipeError
from stepdistill.training.teacher import load_any_teacher_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    """What ``stepdistill schema --kind K`` prints, parsed."""
    out = {}
    for kind in ("distill", "teacher"):
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["schema", "--kind", kind]) == 0
        out[kind] = json.loads(buffer.getvalue())
    return out


def kind_of(data: dict) -> str:
    return "distill" if "method" in data else "teacher"


def errors(schema: dict, data: dict) -> list[str]:
    return [error.message for error in Draft202012Validator(schema).iter_errors(data)]


def test_the_schemas_are_draft_2020_12(schemas):
    for schema in schemas.values():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(schema)


def test_every_shipped_recipe_passes_its_schema(schemas):
    assert len(RECIPES) >= 40
    kinds = set()
    for path in RECIPES:
        data = load_yaml(path)
        kinds.add(kind_of(data))
        assert errors(schemas[kind_of(data)], data) == [], path.name
    assert kinds == {"distill", "teacher"}


def assert_rejected(schemas, recipe: str, change: dict, names: str, nearest: str | None = None) -> None:
    """``change`` merged into the shipped ``recipe`` fails the schema with a message naming
    ``names``, and fails the validator naming it too (and ``nearest``, the valid key it suggests)."""
    data = merge(load_yaml(ROOT / "configs" / recipe), change)
    found = errors(schemas[kind_of(data)], data)
    assert found and any(f"'{names}'" in message for message in found), found
    load = load_distill_recipe if kind_of(data) == "distill" else lambda d: load_teacher_recipe_from(d)
    with pytest.raises(RecipeError) as info:
        load(data)
    message = str(info.value)
    assert f"'{names}'" in message and len(message.splitlines()) == 1, message
    if nearest is not None:
        assert f"did you mean '{nearest}'" in message, message


def load_teacher_recipe_from(data: dict):
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(data, f)
    try:
        return load_any_teacher_recipe(f.name)
    finally:
        Path(f.name).unlink()


def test_a_typo_fails_the_schema_naming_the_key_and_the_validator_names_the_nearest_key(schemas):
    assert_rejected(schemas, "digits_dmd2.yaml", {"training": {"max_step": 100}}, "max_step", nearest="max_steps")
    assert_rejected(schemas, "digits_dmd2.yaml", {"trainig": {"max_steps": 100}}, "trainig", nearest="training")
    assert_rejected(schemas, "sdxl_vsd.yaml", {"memory": {"release_encoder": True}}, "release_encoder", nearest="release_encoders")
    assert_rejected(schemas, "digits_dmd2.yaml", {"dmd": {"gan_generator_weigth": 0.1}}, "gan_generator_weigth", nearest="gan_generator_weight")
    assert_rejected(schemas, "digits_teacher.yaml", {"unet": {"layers_per_blok": 2}}, "layers_per_blok", nearest="layers_per_block")
    assert_rejected(schemas, "t2i_sd_teacher.yaml", {"text_encoder": {"hiden_size": 32}}, "hiden_size", nearest="hidden_size")
    assert_rejected(schemas, "t2i_vae.yaml", {"autoencoder": {"kl_weigth": 0.0}}, "kl_weigth", nearest="kl_weight")
    # a section of another method is an unknown key for this one
    assert_rejected(schemas, "digits_dmd2.yaml", {"consistency": {"num_solver_steps": 10}}, "consistency")
    assert_rejected(schemas, "digits_dmd2.yaml", {"ema": {"decey": 0.9}}, "decey", nearest="decay")  # an optional section


def test_ranges_and_choices_fail_the_schema(schemas):
    data = load_yaml(ROOT / "configs" / "digits_dmd2.yaml")
    for change, keyword in (({"training": {"max_steps": 0}}, "minimum"), ({"ema": {"decay": 1.0}}, "exclusiveMaximum"),
                            ({"training": {"mixed_precision": "fp8"}}, "enum"), ({"optimizers": {"student": {"betas": [0.9]}}}, "minItems"),
                            ({"evaluation": {"teacher_steps": [1, 0]}}, "minimum"), ({"method": "dmd3"}, "enum"),
                            ({"student": {"num_steps": "4"}}, "type")):
        bad = merge(data, change)
        found = list(Draft202012Validator(schemas["distill"]).iter_errors(bad))
        assert [e.validator for e in found] == [keyword], (change, [e.message for e in found])
        with pytest.raises(RecipeError):
            load_distill_recipe(bad)


def leaves(data, prefix=()):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def set_at(data: dict, path: tuple, value) -> dict:
    change = value
    for key in reversed(path):
        change = {key: change}
    return merge(data, change)


ONE_PER_RECIPE_CLASS = ["digits_dmd2.yaml", "sd15_lcm_lora.yaml", "digits_sid.yaml", "sd15_guidance.yaml", "digits_agd.yaml",
                        "digits_progressive.yaml", "digits_reflow.yaml", "digits_teacher.yaml", "t2i_vae.yaml", "t2i_flow_teacher.yaml"]


@pytest.mark.parametrize("recipe", ONE_PER_RECIPE_CLASS)
def test_the_schema_and_the_validator_agree(recipe, schemas):
    """Every key of a shipped recipe set to each of a few values (null, -1, 0.5, "x", [1], true):
    the schema accepts exactly what the validator accepts -- an editor never flags a recipe that
    runs, nor passes one that fails on load -- but for the rules outside the dataclasses (a
    teacher recipe's data.images is required when it is loaded; sections' cross-field
    ``validate()`` rules, none hit here)."""
    data = load_yaml(ROOT / "configs" / recipe)
    kind = kind_of(data)
    load = load_distill_recipe if kind == "distill" else load_teacher_recipe_from
    validator = Draft202012Validator(schemas[kind])
    checked = rejected = 0
    for path in leaves(data):
        if path == ("method",):
            continue
        for value in (None, -1, 0.5, "x", [1], True):
            candidate = set_at(data, path, value)
            try:
                load(candidate)
                accepted = True
            except RecipeError:
                accepted = False
            schema_ok = validator.is_valid(candidate)
            outside = kind == "teacher" and path == ("data", "images") and value is None
            assert schema_ok == accepted or (outside and schema_ok), (recipe, path, value, [e.message for e in validator.iter_errors(candidate)])
            checked += 1
            rejected += not schema_ok
    assert checked > 50 and rejected > checked / 3, (checked, rejected)
