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

Checkpoints you can trust (:meth:`Checkpointer.restore_good`): before restoring, the stored
state's tree and shapes are compared with the new target and the saved config with the new
one; a state that does not fit is a one-line :class:`~mlgen.train.errors.CheckpointMismatch`
naming the first differing config field. A checkpoint that fails to read or validate is
reported in one line, moved aside into ``checkpoints/corrupt/`` (never deleted) and the next
older one is used. A save that fails (a full disk, often in orbax's background thread) is one
warning line when it is noticed, at the next step or at the next save, and orbax's own error
logs with their tracebacks are held back while a :class:`Checkpointer` is open.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

try:  # orbax's per-host array-metadata store (its default handler has one) has no public name
    from orbax.checkpoint._src.metadata.array_metadata_store import Store as _MetadataStore
except ImportError:  # pragma: no cover
    _MetadataStore = None

from mlgen.config import Config, differences, from_dict, to_dict
from mlgen.distributed import any_process, gather_json
from mlgen.train.errors import CheckpointMismatch

log = logging.getLogger("mlgen")

CORRUPT = "corrupt"  # checkpoints/corrupt/<step>: checkpoints that failed to read, set aside


class _OrbaxErrors(logging.Filter):
    """Holds back orbax's ERROR records (one failed save logs several, each with a
    traceback): the Checkpointer reports each failure as one line of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


_FILTER = _OrbaxErrors()
_open_count = 0


def _hold_back_orbax_errors(on: bool) -> None:
    global _open_count
    _open_count += 1 if on else -1
    absl = logging.getLogger("absl")  # orbax logs through absl.logging
    if _open_count > 0 and _FILTER not in absl.filters:
        absl.addFilter(_FILTER)
    elif _open_count <= 0:
        _open_count = 0
        absl.removeFilter(_FILTER)


def one_line(err: BaseException | str) -> str:
    """``Type: the first line of the message`` (at most 300 characters)."""
    if isinstance(err, str):
        return err
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= 300 else line[:297] + "..."


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
        for path, leaf in leaves
        if hasattr(leaf, "shape")
    }


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """``workdir`` as an ``epath.Path``: remote paths (``gs://...``) as given,
    local ones absolute."""
    text = os.fspath(workdir)
    path = epath.Path(text)
    return path if "://" in text else path.absolute()


_single_process_writer = False


def _write_from_one_replica() -> None:
    """In a single process, arrays are written from one replica of each shard.

    Orbax's default on CPU and TPU splits every replicated array into one slice per replica, so
    that several *hosts* share the writing: with one process that only adds work (8 simulated
    devices: a save of ~200 small replicated arrays took 1.3-2.4 s against 0.5-0.6 s without).
    The files are the same either way. Several processes keep orbax's default. Registered once,
    for ``jax.Array`` in orbax's global type-handler registry (what every save looks up).
    """
    global _single_process_writer
    if _single_process_writer or jax.process_count() > 1:
        return
    if _MetadataStore is None:  # pragma: no cover  (a newer orbax: keep its default handler)
        return
    handler = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False, array_metadata_store=_MetadataStore()
    )
    absl = logging.getLogger("absl")  # orbax warns of every override
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl.setLevel(level)
    _single_process_writer = True


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
        self.async_save = async_save
        _write_from_one_replica()
        _hold_back_orbax_errors(True)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=True,  # what an interrupted save left
            ),
        )
        self.closed = False
        self.pending: int | None = None  # an async save not yet known to have completed
        self.failed: dict[int, str] = {}  # steps whose save failed -> why (one line)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _failed(self, step: int, err: BaseException) -> None:
        if step in self.failed:
            return
        self.failed[step] = one_line(err)
        latest = self.latest_step()
        log.warning(
            "checkpoint %d was not written (%s); the latest complete checkpoint is %s",
            step,
            self.failed[step],
            "none" if latest is None else f"step {latest}",
        )

    def poll(self) -> None:
        """Reports (one line) an async save that failed; returns at once."""
        if self.pending is None:
            return
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001  (a failed save is reported, the run goes on)
            self._failed(self.pending, e)
            self.pending = None

    def wait(self) -> None:
        """Waits for an async save; a failure is reported (one line), not raised."""
        if self.pending is None:
            return
        step, self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._failed(step, e)

    def save(
        self,
        step: int,
        state: Any,
        *,
        config: Config | None = None,
        data_state: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving ``step`` (async unless configured otherwise); whether it started. A
        failure (now, or of the previous async save) is one warning line, not an exception:
        see :attr:`failed`."""
        self.wait()
        stored = {k: v for k, v in state.items() if not _empty(v)}
        args = {"state": ocp.args.StandardSave(stored)}
        if config is not None:
            args["config"] = ocp.args.JsonSave(to_dict(config))
        if data_state is not None:  # the same items on every process; process 0 writes them
            for i, each in enumerate(gather_json(data_state)):
                args[f"data_{i}"] = ocp.args.JsonSave(each)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as e:  # noqa: BLE001
            self._failed(step, e)
            return False
        if saved and self.async_save:
            self.pending = step
        elif saved:
            self.wait()
        return saved

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

    def _saved_config(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out["config"]

    def restore_config(self, step: int | None = None) -> Config:
        step = self.latest_step() if step is None else step
        return from_dict(self._saved_config(step))

    def stored_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """``path/of/leaf -> shape`` of the state checkpoint ``step`` holds (its metadata)."""
        handler = ocp.PyTreeCheckpointHandler()
        try:
            meta = handler.metadata(self.directory / str(step) / "state")
        finally:
            handler.close()
        return _shapes(meta.tree)

    def check_fits(
        self,
        step: int,
        abstract_state: Any,
        config: Config | None,
        stored: dict[str, tuple[int, ...]],
        saved: Config | None,
    ) -> None:
        """Raises :class:`CheckpointMismatch` (one line naming the first differing config
        field) unless the state checkpoint ``step`` holds (``stored``: its shapes) has the
        tree and shapes of ``abstract_state``; warns (one line) about model fields that changed
        without changing a shape."""
        target = _shapes({k: v for k, v in abstract_state.items() if not _empty(v)})
        model = differences(saved.model, config.model, "model") if saved and config else []
        if target == stored:
            if model:
                log.warning(
                    "checkpoint %d: resuming with %s changed; the parameters fit",
                    step,
                    ", ".join(f"{f} ({old!r} -> {new!r})" for f, old, new in model),
                )
            return
        way_out = (
            "the checkpoint's state does not fit this config: train in a new workdir "
            "(or start a new run from its weights: init_from=WORKDIR)"
        )
        rest = differences(saved, config) if saved and config else []
        rest = [d for d in rest if d[0] != "workdir" and not d[0].startswith("model")]
        rest.sort(key=lambda d: not d[0].startswith(("optim.", "train.ema", "precision.")))
        if model or rest:
            field, old, new = (model or rest)[0]
            raise CheckpointMismatch(
                f"{field}: checkpoint {step} in {self.directory} has {old!r}, the config has "
                f"{new!r}; {way_out}"
            )
        for path in [*target, *(p for p in stored if p not in target)]:
            if target.get(path) != stored.get(path):
                has = stored.get(path, "nothing")
                raise CheckpointMismatch(
                    f"state: checkpoint {step} in {self.directory} holds {has} at {path}, the "
                    f"config's state {target.get(path, 'nothing')}; {way_out}"
                )

    def restore_good(
        self,
        abstract_state: Any,
        *,
        config: Config | None = None,
        with_data: bool = True,
        valid: Callable[[Any], bool] | None = None,
        set_aside: bool = True,
    ) -> tuple[int, Any, dict | None] | None:
        """The newest checkpoint that reads and validates: ``(step, state, data_state)``, or
        None when there is none.

        The state must fit ``abstract_state`` (and ``config``, when given:
        :meth:`check_fits`, raising :class:`CheckpointMismatch`). A checkpoint that fails to
        read, or whose state ``valid`` rejects, is reported in one line and, with
        ``set_aside``, moved into ``checkpoints/corrupt/`` (process 0); the next older one is
        tried. With several processes all agree on each checkpoint (a collective per try).
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            err: BaseException | str | None = None
            try:
                stored = self.stored_shapes(step)
                saved_dict = self._saved_config(step) if config is not None else None
            except Exception as e:  # noqa: BLE001  (an unreadable checkpoint: try the next)
                err = e
            if any_process(err is not None):
                self._bad(step, err or "unreadable on another process", set_aside)
                continue
            saved = from_dict(saved_dict) if saved_dict is not None else None
            self.check_fits(step, abstract_state, config, stored, saved)
            try:
                state, data_state = self.restore(abstract_state, step, with_data=with_data)
                if valid is not None and not valid(state):
                    err = "its state holds NaN or infinite values"
            except Exception as e:  # noqa: BLE001
                err = e
            if any_process(err is not None):
                self._bad(step, err or "unreadable on another process", set_aside)
                continue
            return step, state, data_state
        return None

    def _bad(self, step: int, err: BaseException | str, set_aside: bool) -> None:
        older = [s for s in self.manager.all_steps() if s < step]
        then = f"trying checkpoint {max(older)}" if older else "no older checkpoint is left"
        where = "left in place"
        if set_aside:
            dest = self.directory / CORRUPT / str(step)
            if jax.process_index() == 0:
                dest.parent.mkdir(parents=True, exist_ok=True)
                n = 0
                while dest.exists():
                    n += 1
                    dest = self.directory / CORRUPT / f"{step}.{n}"
                (self.directory / str(step)).rename(dest)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices(f"mlgen: checkpoint {step} set aside")
            self.manager.reload()
            where = f"moved to {dest}"
        log.warning("checkpoint %d is unusable (%s): %s; %s", step, one_line(err), where, then)

    def close(self) -> None:
        """Waits for a pending save (a failure: one line) and closes orbax's manager (once)."""
        if self.closed:
            return
        self.closed = True
        self.wait()
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001
            log.warning("closing the checkpoints: %s", one_line(e))
        finally:
            _hold_back_orbax_errors(False)
