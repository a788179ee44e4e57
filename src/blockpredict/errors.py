"""Errors a user can act on.

Every error that stems from the user's input or configuration is a
:class:`BlockpredictError`; the CLI prints it as one line ``error: ...`` and
exits with code 2 before any block runs. Messages read
``<what> (<where>): <how to fix>``.
"""

from __future__ import annotations


class BlockpredictError(Exception):
    """Bad input or configuration, found before any block ran (exit code 2)."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        message = what
        if where:
            message += f" ({where})"
        if fix:
            message += f": {fix}"
        super().__init__(message)


class ConfigError(BlockpredictError, ValueError):
    """The workflow is malformed: unknown key, wrong type, bad value."""


class InputError(BlockpredictError, FileNotFoundError):
    """The input container or dataset is missing or unusable."""


class ModelError(BlockpredictError, ValueError):
    """The model cannot be built, loaded or does not fit the data."""


class GeometryError(BlockpredictError, ValueError):
    """Voxel sizes, shapes or ROIs do not fit together."""


class OutputExistsError(BlockpredictError, FileExistsError):
    """The output exists and ``overwrite`` is false."""


class OutputError(BlockpredictError, OSError):
    """The output cannot be written where the workflow puts it."""
