"""Orbax checkpoints of a run: train state (+ EMA), data-iterator state, resolved config.

Layout: ``WORKDIR/checkpoints/<step>/{state, data_<process>, config}``. With several processes
every one joins each save and restore (each writes its shards of the state); the data-iterator
states of all processes are gathered and written by process 0 (orbax writes JSON items on the
primary host only), each process restores its own. A data state saved by a different number of
processes is not restored (a warning; the data start again). Orbax writes each step
into a temporary directory and renames it when complete, so a crash never leaves a half
checkpoint that a restart would read. Restoring takes an abstract target (shapes, dtypes and
the *new* shardings), so a checkpoint restores onto any mesh or device count. Paths go through
``etils.epath`` (what orbax uses): ``gs://bucket/run`` reaches orbax as written.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from mlgen.config import Config, from_dict, to_dict
from mlgen.distributed import gather_json

log = logging.getLogger("mlgen")


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """``workdir`` as an ``epath.Path``: remote paths (``gs://...``) as given,
    local ones absolute."""
    text = os.fspath(workdir)
    path = epath.Path(text)
    return path if "://" in text else path.absolute()


def _empty(x) -> bool:
    return isinstance(x, dict) and not jax.tree.leaves(x)


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for train states.

    Top-level entries of the state that hold no arrays (a model with no non-parameter
    variables has ``model_state == {}``) are not written, and come back as they are in the
    restore target: so checkpoints from before ``model_state`` existed restore too.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = workdir_path(workdir) / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        *,
        config: Config | None = None,
        data_state: dict | None = None,
        force: bool = False,
    ) -> bool:
        stored = {k: v for k, v in state.items() if not _empty(v)}
        args = {"state": ocp.args.StandardSave(stored)}
        if config is not None:
            args["config"] = ocp.args.JsonSave(to_dict(config))
        if data_state is not None:  # the same items on every process; process 0 writes them
            for i, each in enumerate(gather_json(data_state)):
                args[f"data_{i}"] = ocp.args.JsonSave(each)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, abstract_state: Any, step: int | None = None, *, with_data: bool = True):
        """Returns ``(state, data_state or None)`` restored onto ``abstract_state``'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        empty = {k: v for k, v in abstract_state.items() if _empty(v)}
        args = {
            "state": ocp.args.StandardRestore(
                {k: v for k, v in abstract_state.items() if k not in empty}
            )
        }
        data_key = f"data_{jax.process_index()}"
        has_data = with_data and self._has_data(step)
        if has_data:
            args[data_key] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        state = {**out["state"], **empty}
        return {k: state[k] for k in abstract_state}, (out[data_key] if has_data else None)

    def _has_data(self, step: int) -> bool:
        """Whether ``step`` holds data states of exactly this many processes."""
        n, where = jax.process_count(), self.directory / str(step)
        if not (where / "data_0").exists():
            return False
        if (where / f"data_{n - 1}").exists() and not (where / f"data_{n}").exists():
            return True
        saved = sum(1 for p in where.iterdir() if p.name.startswith("data_"))
        log.warning(
            "checkpoint %d holds the data-iterator states of %d processes, not %d: "
            "the data start again from the beginning",
            step,
            saved,
            n,
        )
        return False

    def restore_config(self, step: int | None = None) -> Config:
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return from_dict(out["config"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
