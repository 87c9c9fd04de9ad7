"""The README's commands are the ones CI runs and the CLI knows."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = next(line for block in _bash_blocks(readme) for line in block.splitlines() if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command.strip() in ci.replace("(", "").replace(") || status=$?", "")


def test_quick_start_installs_pinned_torch_first():
    readme = (ROOT / "README.md").read_text()
    for block in _bash_blocks(readme)[:2]:
        assert block.strip().startswith("pip install -q torch==2.13.0") or block.strip().startswith("pip install torch==2.13.0")


def test_documented_subcommands_exist():
    from stepdistill.cli import build_parser

    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)  # argparse keeps them here
    readme = (ROOT / "README.md").read_text()
    commands = "\n".join(_bash_blocks(readme))
    for name in re.findall(r"(?:^|&& )stepdistill ([a-z-]+)", commands, flags=re.M):
        assert name in subcommands, name
