"""A task spec: which model kind, objective and data it trains, its checks, how it builds.

A task module defines its cross-section checks and its builder and registers one
:class:`TaskSpec` (``register``); ``Config.validate`` reaches the checks through
``mlgen.config``'s registry and ``mlgen.runs`` the builder. What every task shares is here: the
type checks of the sections, the mesh-rules check, the batch split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from jax.sharding import Mesh

from mlgen import config as config_lib
from mlgen import sharding
from mlgen.config import Config, check, prefixed
from mlgen.models.family import Family, family_of
from mlgen.nn.policy import Policy
from mlgen.train.task import Task


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """A registered task (``Config.task`` names it).

    Attributes:
      name: ``"lm"``, ``"diffusion"``, ...
      kinds: the model-family kinds it trains (``Family.kind``).
      objective: the objective config class(es) it takes.
      data: the data config class(es) it takes.
      checks: ``(config, family, mesh sizes | None) -> None``: its cross-section checks
        (``ConfigError`` naming the field), after the shared ones.
      build: ``(config, family, mesh, rules) -> Task``.
      batch_axes: logical axes of batch keys the task adds to the family's.
      check_data: ``(data config) -> None``: reads the data source before training (its files
        exist and hold data; ``ConfigError`` naming the data field). ``mlgen.train`` runs it
        before the workdir is created; ``Config.validate`` does not (``mlgen plan`` never reads
        the data).
    """

    name: str
    kinds: tuple[str, ...]
    objective: type | tuple[type, ...]
    data: type | tuple[type, ...]
    checks: Callable[[Config, Family, dict[str, int] | None], None]
    build: Callable[[Config, Family, Mesh, sharding.Rules], Task]
    batch_axes: dict[str, tuple] = dataclasses.field(default_factory=dict)
    check_data: Callable[[object], None] | None = None

    def check(self, cfg: Config, mesh: dict[str, int] | None) -> None:
        """Every check of ``cfg`` for this task (``mesh``: axis sizes, when devices are known)."""
        family = family_of(cfg.model)
        check(
            family.kind in self.kinds,
            "model",
            f"the {self.name} task trains {' or '.join(self.kinds)} models; "
            f"{family.name} is a {family.kind}",
        )
        for section, want in (("objective", self.objective), ("data", self.data)):
            value = getattr(cfg, section)
            names = [c.__qualname__ for c in (want if isinstance(want, tuple) else (want,))]
            check(
                isinstance(value, want),
                section,
                f"the {self.name} task takes {' or '.join(names)}, got {type(value).__qualname__}",
            )
        rules = rules_for(cfg, family, mesh)
        if mesh is not None:
            used = set(family.used_axes(cfg.model)) | {
                n for axes in self.batch_axes_of(family).values() for n in axes if n
            }
            sharding.check_mesh_use(
                cfg.mesh.rules, rules, mesh, used, what=f"the {family.name} model"
            )
            if family.check is not None:

                def shards(name: str) -> int:
                    return sharding.shards_of(rules, name, mesh)

                prefixed("model", family.check, cfg.model, shards)
            check_batch(
                cfg.data.batch_size,
                cfg.optim.grad_accum_steps,
                sharding.shards_of(rules, "batch", mesh),
            )
        self.checks(cfg, family, mesh)

    def batch_axes_of(self, family: Family) -> dict[str, tuple]:
        return {**family.batch_axes, **self.batch_axes}


def policy(cfg: Config) -> Policy:
    """The model policy of a run: its ``precision`` dtypes and ``remat`` (for ``Family.build``)."""
    return Policy(params=cfg.precision.params, compute=cfg.precision.compute, remat=cfg.remat)


def rules_for(cfg: Config, family: Family, mesh: dict[str, int] | None) -> sharding.Rules:
    """The logical -> mesh rules of a run: ``mesh.rules`` (derived from the mesh's axis sizes for
    ``auto``) plus the family's own fragments; an unknown name is a ConfigError. With no mesh
    yet (``None``), the rules of a one-device mesh."""
    return sharding.get_rules(cfg.mesh.rules, mesh or {}, family.rules)


def check_batch(batch_size: int, grad_accum_steps: int, shards: int) -> None:
    """The global batch splits over the mesh axes the batch is sharded on (``shards`` ways), so do
    the gradient-accumulation micro-batches, and so do the processes (each host loads its share)."""
    check(
        batch_size % shards == 0,
        "data.batch_size",
        f"{batch_size} is not divisible by the {shards} shards of the batch "
        "(mesh data*fsdp*expert)",
    )
    check(
        batch_size % (grad_accum_steps * shards) == 0,
        "optim.grad_accum_steps",
        f"{grad_accum_steps} micro-batches of data.batch_size={batch_size} do not split evenly "
        f"over the {shards} shards of the batch",
    )
    check(
        batch_size % jax.process_count() == 0,
        "data.batch_size",
        f"{batch_size} is not divisible by the process count {jax.process_count()}",
    )


def register(spec: TaskSpec) -> TaskSpec:
    """Registers ``spec`` under ``spec.name``; returns it."""
    config_lib.register_task(spec)
    return spec
