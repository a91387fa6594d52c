"""Orbax checkpoints of a run: train state (+ EMA), data-iterator state, resolved config.

Layout: ``WORKDIR/checkpoints/<step>/{state, data_<process>, config}``. Orbax writes each step
into a temporary directory and renames it when complete, so a crash never leaves a half
checkpoint that a restart would read. Restoring takes an abstract target (shapes, dtypes and
the *new* shardings), so a checkpoint restores onto any mesh or device count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mlgen.config import Config, from_dict, to_dict


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for train states."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, config: Config | None = None, data_state: dict | None = None,
             force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        if config is not None:
            args["config"] = ocp.args.JsonSave(to_dict(config))
        if data_state is not None:
            args[f"data_{jax.process_index()}"] = ocp.args.JsonSave(data_state)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, abstract_state: Any, step: int | None = None, *, with_data: bool = True):
        """Returns ``(state, data_state or None)`` restored onto ``abstract_state``'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        data_key = f"data_{jax.process_index()}"
        has_data = with_data and (self.directory / str(step) / data_key).exists()
        if has_data:
            args[data_key] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return out["state"], (out[data_key] if has_data else None)

    def restore_config(self, step: int | None = None) -> Config:
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return from_dict(out["config"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or abstract values) with ``shardings``."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
