"""User-facing errors. The CLI prints any :class:`StepdistillError` as one line and exits 2."""


class StepdistillError(Exception):
    """Bad input from the user (paths, recipes, options): a clear one-line message."""


class TeacherLoadError(StepdistillError, ValueError):
    """A teacher path that is missing, not a diffusers pipeline, or of an unsupported family."""


class RecipeError(StepdistillError, ValueError):
    """A recipe (YAML) with an unknown key, a wrong type or an invalid value."""


class OutputDirError(StepdistillError):
    """An output directory that already holds a different run (see --overwrite / --resume)."""


class DataError(StepdistillError):
    """A dataset, image folder, prompt file or tensor cache that cannot be used as given."""


class TrainingDiverged(StepdistillError):
    """More steps than ``training.max_skipped_steps`` had a non-finite loss or gradient: the run
    stops; the latest checkpoint in the run directory is the last good state."""


class TrainingInterrupted(Exception):
    """SIGTERM / SIGINT (Ctrl-C) during training: a checkpoint was written at the next step
    boundary and the run stopped; ``--resume`` continues it. The CLI exits with 128 + ``signum``."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
