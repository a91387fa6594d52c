"""Runs by name: config -> registered task and family -> built task -> the one trainer.

This module (with ``mlgen.cli``) is where names are resolved: ``Config.task`` to a task spec,
the model config to its family. ``mlgen.train`` / ``mlgen.restore`` are :func:`train` and
:func:`restore`; the trainer below them takes a built task and looks nothing up.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import jax
from etils import epath

import mlgen.models  # noqa: F401  (registers the built-in model families)
import mlgen.tasks  # noqa: F401  (registers the built-in tasks)
from mlgen import config as config_lib
from mlgen import init_from, sharding
from mlgen.config import InputError, check, prefixed
from mlgen.data.paths import unwritable
from mlgen.models.family import family_of
from mlgen.nn.policy import check_remat_devices
from mlgen.tasks.base import rules_for
from mlgen.train import trainer
from mlgen.train.task import Task
from mlgen.train.trainer import Setup, TrainResult, log


def build_task(cfg: config_lib.Config, mesh) -> tuple[Task, sharding.Rules]:
    """The built task of a validated ``cfg`` on ``mesh``, and the rules it runs under."""
    spec = config_lib.task_spec(cfg.task)
    family = family_of(cfg.model)
    rules = rules_for(cfg, family, dict(mesh.shape))
    return spec.build(cfg, family, mesh, rules), rules


def setup(cfg: config_lib.Config, *, devices: list | None = None, abstract: bool = False) -> Setup:
    """Validates ``cfg`` against the devices, builds mesh, task and sharded train state
    (``abstract``: shapes and shardings only, e.g. to restore a checkpoint into)."""
    devices = list(jax.devices() if devices is None else devices)
    cfg.validate(len(devices))
    check_remat_devices(cfg.remat, devices)  # what only the devices know, still before compiling
    mesh = sharding.make_mesh(cfg.mesh, devices)
    task, rules = build_task(cfg, mesh)
    return trainer.prepare(cfg, mesh, rules, task, abstract=abstract)


def check_workdir(cfg: config_lib.Config) -> None:
    """``workdir:`` is a directory that can be created or written (local paths; checked before
    anything is created on disk)."""
    why = unwritable(cfg.workdir)
    check(why is None, "workdir", f"{cfg.workdir!r} {why}")


def train(
    config: config_lib.Config | str | os.PathLike,
    overrides: Iterable[str] = (),
    *,
    devices: list | None = None,
) -> TrainResult:
    """Trains (or resumes) the run described by ``config`` (a Config or a config file path).

    Everything a mistake could be found in is checked before the workdir is created: the
    config (against the devices too), the workdir itself, the data source (its files
    exist and hold text, ``TaskSpec.check_data``) and, for a new run with ``init_from``, the
    source directory and its model config (:mod:`mlgen.init_from`).

    Example (a notebook)::

        import mlgen
        result = mlgen.train("configs/lm/tiny.py", ["workdir=/tmp/tiny", "train.num_steps=100"])
        print(result.final_metrics["eval_loss"])
    """
    cfg = config_lib.load(config, overrides)
    check_workdir(cfg)
    spec = config_lib.task_spec(cfg.task)
    if spec.check_data is not None:
        prefixed("data", spec.check_data, cfg.data)
    kind = init_from.check_source(cfg) if cfg.init_from else None
    s = setup(cfg, devices=devices)
    if kind is not None:
        log.info("%s", init_from.describe(cfg, kind))
        s = dataclasses.replace(s, state=init_from.initial_state(s, kind))
    return trainer.fit(s)


def saved_steps(workdir: str | os.PathLike) -> list[int]:
    """The checkpointed steps of the run in ``workdir``, oldest first.

    Raises:
      InputError: ``workdir:`` missing, not a directory, or holding no checkpoint (nothing is
        created: orbax would make ``WORKDIR/checkpoints``).
    """
    text = os.fspath(workdir)
    path = epath.Path(text)
    check(path.exists(), "workdir", f"no such directory {text!r}", InputError)
    check(path.is_dir(), "workdir", f"{text!r} is a file, not a run's directory", InputError)
    ckpts = path / "checkpoints"
    steps = (
        sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
    )
    check(
        bool(steps),
        "workdir",
        f"{text!r} holds no checkpoint (WORKDIR/checkpoints/<step>): not a run, or one that "
        "has not saved yet",
        InputError,
    )
    return steps


def saved_config(
    workdir: str | os.PathLike, overrides: Iterable[str] = (), *, step: int | None = None
) -> config_lib.Config:
    """The config the run in ``workdir`` saved (with its latest or ``step`` checkpoint), with
    ``overrides`` applied and validated; ``workdir`` checked first (:func:`saved_steps`)."""
    workdir = os.fspath(workdir)
    steps = saved_steps(workdir)
    check(
        step is None or step in steps,
        "step",
        f"the run has no checkpoint {step}; saved: {steps}",
        InputError,
    )
    cfg = dataclasses.replace(trainer.saved_config(workdir, step), workdir=workdir)
    return config_lib.load(cfg, overrides)


def restore(
    workdir: str | os.PathLike | config_lib.Config,
    overrides: Iterable[str] = (),
    *,
    devices: list | None = None,
    step: int | None = None,
) -> TrainResult:
    """Loads a run's saved config and latest (or given) checkpoint, onto the current devices.

    ``overrides`` change the saved config (e.g. ``mesh.data=4``) before restoring; the
    checkpoint's state is resharded onto the new mesh. ``workdir`` may also be the config
    :func:`saved_config` returned (its ``workdir`` is restored).
    """
    if isinstance(workdir, config_lib.Config):
        cfg = config_lib.load(workdir, overrides)
    else:
        cfg = saved_config(workdir, overrides, step=step)
    return trainer.restore_state(setup(cfg, devices=devices, abstract=True), step)
