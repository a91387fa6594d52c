"""SIGTERM / SIGINT end a run at a step boundary, with a checkpoint, instead of losing it.

``with Preemption() as p:`` installs handlers that only note the signal; the training loop asks
:meth:`Preemption.requested` after each step, saves synchronously and returns. A second signal
exits at once (status 128 + signal number, one line on stderr): nothing is half written, since
orbax writes each checkpoint into a temporary directory that it renames when complete, and the
previous checkpoint is left as it was. The previous handlers come back on exit.

With several processes a signal may reach only some of them, or each at another step: every
``train.preemption_sync_every`` steps (default 10) and at the last, all processes share their
flags (one tiny collective, ``distributed.any_process``), so all stop after the same step and
join the same save. Not every step: the collective waits for the step before it, which would
stop the host from queueing the next step while the devices run this one. One process checks
every step.
"""

from __future__ import annotations

import os
import signal
import threading

import jax

from mlgen import distributed

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Notes SIGTERM / SIGINT while training (see the module docstring).

    Outside the main thread Python cannot install signal handlers: there, nothing is
    installed and :meth:`requested` is only true if :meth:`request` was called.
    """

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Asks the run to stop after the current step, as that signal would."""
        self.signum = signum

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second one: leave now, nothing half written
            name = signal.Signals(signum).name
            os.write(2, f"mlgen: second {name}: exiting now, without saving\n".encode())
            os._exit(128 + signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return (
            signal.Signals(self.signum).name
            if self.signum is not None
            else "another process's signal"
        )

    def requested(self, step: int, last: bool = False, every: int = 10) -> bool:
        """Whether any process was signalled, asked after ``step``: the same answer on all.
        With several processes only every ``every`` steps or at the ``last`` one (False in
        between), since it is a collective every process must join at the same step."""
        if jax.process_count() > 1 and not (last or step % every == 0):
            return False
        return distributed.any_process(self.signum is not None)
