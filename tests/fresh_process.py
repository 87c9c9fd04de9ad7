"""Run code in a new interpreter that must never import stepdistill: what a user of an exported
pipeline directory does with plain diffusers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def run_fresh_python(code: str, cwd) -> str:
    """Run ``code`` in a new interpreter (cwd outside the repo) that must never import stepdistill."""
    code = textwrap.dedent(code) + "\nimport sys\nassert 'stepdistill' not in sys.modules, 'stepdistill was imported'\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
