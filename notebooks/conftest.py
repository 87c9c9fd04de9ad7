"""Notebooks run in CI (pytest --nbmake, see pyproject.toml) as smoke tests: a few training steps
each. Run them yourself in Jupyter for the full-size runs (their defaults)."""

import os

os.environ.setdefault("STEPDISTILL_NOTEBOOK_STEPS", "4")
os.environ.setdefault("STEPDISTILL_NOTEBOOK_TEACHER_STEPS", "4")
os.environ.setdefault("STEPDISTILL_NOTEBOOK_IMAGES", "200")
os.environ.setdefault("STEPDISTILL_NOTEBOOK_SAMPLES", "100")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
