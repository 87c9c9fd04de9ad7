"""The layers of DESIGN.md, checked on the source: arrows point down only, and benchmarks (digits,
shapes) are users of the library that nothing below them imports -- not even lazily inside a
function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "stepdistill"

# a layer may import itself and anything in a layer further down this list
LAYERS = [
    ("benchmarks and the CLI", {"cli", "digits", "shapes", "t2i", "sample", "__init__"}),
    ("distillers", {"distillers"}),
    ("training", {"training"}),
    ("evaluation", {"evaluation", "metrics", "images"}),
    ("export and pipelines", {"export", "model_card", "pipelines", "hybrid", "attention", "planning", "sampling"}),
    ("teachers", {"teachers"}),
    ("data", {"data"}),
    ("foundations", {"schedule", "config", "errors", "plugins", "atomic"}),
]
BENCHMARKS = {"digits", "shapes", "t2i"}


def layer_of(top: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"stepdistill.{top} is in no layer of this test: add it to LAYERS")


def imported_modules(path: Path) -> set[str]:
    """Every stepdistill module ``path`` imports, at any depth of the file (lazy imports included)."""
    package = ["stepdistill", *path.relative_to(PACKAGE).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name == "stepdistill" or name.startswith("stepdistill."))
    return found


def top_level(module: str) -> str:
    """The top-level module or package of ``stepdistill.x.y``; names imported from the package
    itself (``from stepdistill import __version__``) belong to ``__init__``."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == "pipelines":  # the repository's pipelines/, shipped as stepdistill.pipelines
        return "pipelines"
    if len(parts) == 1 or not ((PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file()):
        return "__init__"
    return parts[1]


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "weights" not in p.parts)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_only(path):
    own = top_level(".".join(["stepdistill", *path.relative_to(PACKAGE).with_suffix("").parts]))
    for module in imported_modules(path):
        target = top_level(module)
        if target == own:
            continue
        assert layer_of(target) >= layer_of(own), f"{path.relative_to(PACKAGE)} ({LAYERS[layer_of(own)][0]}) imports {module} ({LAYERS[layer_of(target)][0]})"


def test_no_library_module_imports_a_benchmark():
    offenders = []
    for path in SOURCES:
        own = top_level(".".join(["stepdistill", *path.relative_to(PACKAGE).with_suffix("").parts]))
        if own in BENCHMARKS or own == "cli":
            continue
        offenders += [f"{path.relative_to(PACKAGE)} imports {m}" for m in imported_modules(path) if top_level(m) in BENCHMARKS]
    assert not offenders, offenders


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    sample = PACKAGE / "distillers" / "run.py"
    modules = imported_modules(sample)
    assert "stepdistill.evaluation.benchmarks" in modules  # imported inside a function
    assert "stepdistill.distillers.base" in modules  # relative import
