"""stepdistill: diffusion step distillation -- few-step students from multi-step teachers,
exported as drop-in diffusers pipelines. See README.md and docs/design.md."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stepdistill")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
