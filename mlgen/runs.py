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

import mlgen.models  # noqa: F401  (registers the built-in model families)
import mlgen.tasks  # noqa: F401  (registers the built-in tasks)
from mlgen import config as config_lib
from mlgen import sharding
from mlgen.models.family import family_of
from mlgen.nn.policy import check_remat_devices
from mlgen.tasks.base import rules_for
from mlgen.train import trainer
from mlgen.train.task import Task
from mlgen.train.trainer import Setup, TrainResult


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


def train(
    config: config_lib.Config | str | os.PathLike,
    overrides: Iterable[str] = (),
    *,
    devices: list | None = None,
) -> TrainResult:
    """Trains (or resumes) the run described by ``config`` (a Config or a config file path).

    Example (a notebook)::

        import mlgen
        result = mlgen.train("configs/lm/tiny.py", ["workdir=/tmp/tiny", "train.num_steps=100"])
        print(result.final_metrics["eval_loss"])
    """
    cfg = config_lib.load(config, overrides)
    return trainer.fit(setup(cfg, devices=devices))


def restore(
    workdir: str | os.PathLike,
    overrides: Iterable[str] = (),
    *,
    devices: list | None = None,
    step: int | None = None,
) -> TrainResult:
    """Loads a run's saved config and latest (or given) checkpoint, onto the current devices.

    ``overrides`` change the saved config (e.g. ``mesh.data=4``) before restoring; the
    checkpoint's state is resharded onto the new mesh.
    """
    workdir = os.fspath(workdir)
    cfg = dataclasses.replace(trainer.saved_config(workdir, step), workdir=workdir)
    cfg = config_lib.load(cfg, overrides)
    return trainer.restore_state(setup(cfg, devices=devices, abstract=True), step)
