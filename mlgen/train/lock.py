"""One live trainer per workdir: ``WORKDIR/trainer.lock`` names the process that trains there.

A second trainer on the same workdir refuses (:class:`~mlgen.train.errors.WorkdirLocked`, one
line naming the PID and host). A lock left by a process that is gone (killed, machine
rebooted onto the same hostname) is taken over, with one line naming the dead PID. A lock
held from another host cannot be checked from here: it is refused, and the message names
the file to delete if that run is known to be over.

Only process 0 of a run takes the lock (a workdir shared by the hosts of one run is one
trainer); the others learn from it whether it got the lock. On a local filesystem the lock
file is created atomically (``O_CREAT | O_EXCL``); on a remote one (``gs://``) it is written
after a check, which two trainers starting in the same second could both pass.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import jax
from etils import epath

from mlgen import distributed
from mlgen.train.errors import WorkdirLocked

log = logging.getLogger("mlgen")

LOCK_NAME = "trainer.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir's lock (process 0), or raises
    :class:`WorkdirLocked` on every process."""

    def __init__(self, workdir: epath.Path):
        self.workdir = workdir
        self.path = workdir / LOCK_NAME
        self.remote = "://" in str(workdir)
        self.mine = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time())}
        )
        self.held = False

    def __enter__(self) -> "WorkdirLock":
        error = None
        if jax.process_index() == 0:
            try:
                self._acquire()
            except WorkdirLocked as e:
                error = e
        refused = distributed.any_process(error is not None)  # process 0's answer, on all
        if error is not None:
            raise error
        if refused:
            raise WorkdirLocked(f"workdir: {self.workdir} is locked (see process 0's error)")
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire(self) -> None:
        for _ in range(2):  # the second try follows taking over a stale lock
            if self._create():
                self.held = True
                return
            holder = self._holder()
            if holder is None:  # released (or unreadable) in between: try again
                continue
            pid, host = holder.get("pid"), holder.get("host")
            if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
                log.warning(
                    "workdir %s: taking over the lock of process %d, which is gone",
                    self.workdir,
                    pid,
                )
                self.path.unlink(missing_ok=True)
                continue
            where = "this host" if host == socket.gethostname() else f"host {host}"
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder.get("since", 0)))
            hint = (
                "stop it, or train in another workdir"
                if where == "this host"
                else f"if that run is over, delete {self.path}"
            )
            raise WorkdirLocked(
                f"workdir: {self.workdir} is in use by process {pid} on {where} "
                f"(training since {since}); {hint}"
            )
        raise WorkdirLocked(
            f"workdir: cannot read the lock {self.path}; if no trainer runs in {self.workdir}, "
            "delete it"
        )

    def _create(self) -> bool:
        if self.remote:
            if self.path.exists():
                return False
            self.path.write_text(self.mine)
            return True
        try:
            fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.mine)
        return True

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def release(self) -> None:
        """Removes the lock file if this process holds it (and it is still this one's)."""
        if self.held:
            self.held = False
            try:
                if self.path.read_text() == self.mine:
                    self.path.unlink()
            except FileNotFoundError:
                pass
