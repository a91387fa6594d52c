"""Why a run stopped or refused to start: one-line errors the CLI prints without a traceback.

Each is a :class:`mlgen.config.ConfigError` (the project's user-facing error: ``str(err)`` is
one line that starts with what is at fault), with the exit status ``mlgen train`` returns.
"""

from __future__ import annotations

from mlgen.config import ConfigError


class RunError(ConfigError):
    """A run cannot go on as asked (not a bad value in the config file itself)."""

    exit_code = 2


class WorkdirLocked(RunError):
    """Another live trainer holds the workdir's lock."""


class CheckpointMismatch(RunError):
    """The latest checkpoint does not fit the model the config builds."""


class CheckpointWriteError(RunError):
    """The run's final checkpoint could not be written (disk full, permissions, ...)."""

    exit_code = 1


class Diverged(RunError):
    """Too many consecutive steps had a non-finite loss or gradient, or the state went
    non-finite: the run stopped (nothing non-finite was checkpointed)."""

    exit_code = 3
