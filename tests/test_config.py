"""Recipe validation: every error names the key / field and what was expected."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from stepdistill.config import OptimizerConfig, TrainingConfig, from_dict, load_recipe, to_dict
from stepdistill.training.teacher import TeacherRecipe
from stepdistill.errors import RecipeError

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Section:
    steps: int = 4
    scale: float = 1.5
    name: str = "x"
    enabled: bool = True
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    betas: tuple[float, float] = (0.9, 0.99)
    limit: Optional[float] = None


@dataclass
class Recipe:
    teacher: str  # required
    section: Section = field(default_factory=Section)
    optimizers: dict[str, OptimizerConfig] = field(default_factory=dict)


def error_of(data) -> str:
    with pytest.raises(RecipeError) as info:
        from_dict(Recipe, data)
    return str(info.value)


def test_valid_recipe_is_typed_and_defaults_fill_in():
    recipe = from_dict(Recipe, {"teacher": "t", "section": {"scale": 2, "sizes": [3, 4]}, "optimizers": {"student": {"lr": 1e-5}}})
    assert recipe.section.scale == 2.0 and isinstance(recipe.section.scale, float)
    assert recipe.section.sizes == (3, 4) and recipe.section.steps == 4
    assert recipe.optimizers["student"].lr == 1e-5 and recipe.optimizers["student"].betas == (0.9, 0.999)
    assert to_dict(recipe)["section"]["sizes"] == [3, 4]


def test_unknown_key_names_key_section_and_nearest_valid_key():
    msg = error_of({"teacher": "t", "section": {"stpes": 3}})
    assert "'stpes'" in msg and "section 'section'" in msg and "did you mean 'steps'" in msg


def test_unknown_top_level_key_and_nested_dict_section():
    msg = error_of({"teacher": "t", "sectoin": {}})
    assert "'sectoin'" in msg and "top level" in msg and "did you mean 'section'" in msg
    msg = error_of({"teacher": "t", "optimizers": {"student": {"learning_rate": 1e-4}}})
    assert "'learning_rate'" in msg and "optimizers.student" in msg


def test_unknown_key_in_an_optional_section_names_key_and_nearest_valid_key():
    @dataclass
    class WithOptional:
        ema: Optional[Section] = None

    with pytest.raises(RecipeError) as info:
        from_dict(WithOptional, {"ema": {"stpes": 3}})
    msg = str(info.value)  # was: field 'ema' expects a mapping (Section) or null
    assert "'stpes'" in msg and "section 'ema'" in msg and "did you mean 'steps'" in msg
    assert from_dict(WithOptional, {"ema": None}).ema is None
    with pytest.raises(RecipeError, match="field 'ema' expects a mapping"):
        from_dict(WithOptional, {"ema": 3})


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = error_of({"teacher": "t", "section": {"zzzzzz": 1}})
    assert "'zzzzzz'" in msg and "valid keys" in msg and "steps" in msg


@pytest.mark.parametrize(
    "section, field_name, expected",
    [
        ({"steps": "four"}, "section.steps", "int"),
        ({"steps": 2.5}, "section.steps", "int"),
        ({"steps": True}, "section.steps", "int"),
        ({"scale": "big"}, "section.scale", "float"),
        ({"enabled": "yes"}, "section.enabled", "bool"),
        ({"name": 3}, "section.name", "str"),
        ({"sizes": 3}, "section.sizes", "list of int"),
        ({"sizes": [1, "x"]}, "section.sizes[1]", "int"),
        ({"limit": "none"}, "section.limit", "float"),
    ],
)
def test_wrong_type_names_field_and_expected_type(section, field_name, expected):
    msg = error_of({"teacher": "t", "section": section})
    assert f"'{field_name}'" in msg and expected in msg


def test_literal_and_fixed_length_tuple():
    msg = error_of({"teacher": "t", "section": {"mode": "c"}})
    assert "'section.mode'" in msg and "'a'" in msg and "'b'" in msg
    msg = error_of({"teacher": "t", "section": {"betas": [0.9]}})
    assert "'section.betas'" in msg and "2 values" in msg


def test_section_that_is_not_a_mapping():
    msg = error_of({"teacher": "t", "section": [1, 2]})
    assert "section" in msg and "mapping" in msg


def test_missing_required_field_is_named():
    msg = error_of({"section": {}})
    assert "missing required field 'teacher'" in msg


def test_load_recipe_reports_the_file_and_applies_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("teacher: t\nsection:\n  steps: 3\n")
    recipe = load_recipe(path, Recipe, overrides={"section": {"scale": 4}})
    assert recipe.section.steps == 3 and recipe.section.scale == 4.0
    path.write_text("teacher: t\nsection:\n  stepz: 3\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: unknown key 'stepz'"):
        load_recipe(path, Recipe)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml", Recipe)
    path.write_text("teacher: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path, Recipe)


def test_shipped_teacher_recipe_validates():
    recipe = load_recipe(REPO / "configs" / "digits_teacher.yaml", TeacherRecipe)
    assert recipe.scheduler.prediction_type == "v_prediction"
    assert recipe.scheduler.timestep_spacing == "trailing"
    assert isinstance(recipe.training, TrainingConfig) and recipe.training.max_steps > 0
    with pytest.raises(RecipeError, match="'training.mixed_precision' must be one of"):
        load_recipe(REPO / "configs" / "digits_teacher.yaml", TeacherRecipe, {"training": {"mixed_precision": "fp32"}})
