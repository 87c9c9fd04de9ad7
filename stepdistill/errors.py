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
