"""Argument parsing for the ``mlgen`` subcommands: every mistake is one line naming the flag.

:class:`Parser` is ``argparse.ArgumentParser`` whose errors (a missing or unknown argument, a
value of the wrong type) raise :class:`~mlgen.config.InputError` instead of printing the usage
and exiting, so that ``mlgen.cli`` prints them like every other user error (one line, exit
status 2; ``--debug`` shows the traceback). The checks below name the flag at fault.
"""

from __future__ import annotations

import argparse

from mlgen.config import InputError
from mlgen.data.paths import unwritable


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are :class:`InputError` (one line, no usage dump)."""

    def error(self, message: str):
        raise InputError(f"{message} (see {self.prog} --help)")


def at_least(value: float | None, minimum: float, flag: str, why: str = "") -> None:
    """``flag: must be >= minimum, got value`` unless ``value`` is None or at least ``minimum``."""
    if value is not None and not value >= minimum:
        raise InputError(f"{flag}: must be >= {minimum}{why}, got {value}")


def output_file(path: str, flag: str, suffixes: tuple[str, ...]) -> None:
    """``path`` ends in one of ``suffixes`` and (when local) can be written or created (its
    folder too). Checked before any work is done."""
    if not path.endswith(suffixes):
        raise InputError(f"{flag}: must end in {' or '.join(suffixes)}, got {path!r}")
    why = unwritable(path, kind="file")
    if why:
        raise InputError(f"{flag}: {path!r} {why}")
