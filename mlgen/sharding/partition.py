"""Logical names -> shardings: sharded init, activation constraints, batch placement."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlgen.sharding.rules import Rules, check_names, get_rules

_RECORDING: list[set[str]] = []


def resolve(mesh: Mesh, rules: str | Rules) -> Rules:
    """Rules as (logical, mesh axes) pairs: a preset name,
    ``"auto"`` (derived from ``mesh``) or pairs."""
    return get_rules(rules, dict(mesh.shape)) if isinstance(rules, str) else tuple(rules)


@contextlib.contextmanager
def use(mesh: Mesh, rules: str | Rules):
    """Activates ``mesh`` and the logical-axis ``rules`` (``"auto"``, a preset name or pairs)."""
    with jax.set_mesh(mesh), flax.core.spmd.logical_axis_rules(resolve(mesh, rules)):
        yield


@contextlib.contextmanager
def recording():
    """Collects every logical axis name constrained or annotated while active (a set)."""
    names: set[str] = set()
    _RECORDING.append(names)
    try:
        yield names
    finally:
        _RECORDING.remove(names)


def _current_rules() -> tuple:
    return tuple(flax.core.spmd.get_logical_axis_rules())


def spec(names: tuple[str | None, ...], rules: Rules | None = None) -> P:
    """PartitionSpec of logical ``names`` under ``rules`` (default: the active ones)."""
    check_names(names)
    for rec in _RECORDING:
        rec.update(n for n in names if n is not None)
    table = dict(_current_rules() if rules is None else rules)
    used: set[str] = set()
    out = []
    for n in names:
        axes = table.get(n) if n is not None else None
        if axes is not None:
            tup = (axes,) if isinstance(axes, str) else tuple(axes)
            tup = tuple(a for a in tup if a not in used)  # a mesh axis shards one dim only
            used.update(tup)
            axes = None if not tup else (tup[0] if len(tup) == 1 else tup)
        out.append(axes)
    return P(*out)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        if _RECORDING:
            check_names(names)
            for rec in _RECORDING:
                rec.update(n for n in names if n is not None)
        return x
    return jax.lax.with_sharding_constraint(x, spec(names))


def fit_shardings(abstract: Any, shardings: Any) -> Any:
    """Replicates any dimension a sharding cannot split evenly (e.g. 2 kv heads on tensor=4).

    Rules are written per logical name; small models and GQA meet meshes whose axes do not
    divide every dimension, and replicating that dimension is what a user would want.
    """

    def fit(x, sh):
        if not isinstance(sh, NamedSharding):
            return sh
        parts = list(sh.spec) + [None] * (len(x.shape) - len(sh.spec))
        for i, axes in enumerate(parts):
            if axes is None:
                continue
            names = (axes,) if isinstance(axes, str) else tuple(axes)
            size = int(np.prod([sh.mesh.shape[a] for a in names]))
            if x.shape[i] % size:
                parts[i] = None
        return NamedSharding(sh.mesh, P(*parts))

    return jax.tree.map(fit, abstract, shardings)


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or abstract values) with ``shardings``."""
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            tree,
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    return nnx.split(model, nnx.Param, ...)


def sharded_init(
    make: Callable[[], nnx.Module],
    mesh: Mesh,
    *,
    init: Callable[[Any, Any], Any] | None = None,
    init_shardings: Callable[[Any, Any, Any], Any] | None = None,
    abstract: bool = False,
) -> tuple[nnx.GraphDef, Any, Any]:
    """Initialises a model (and what ``init`` builds from it) directly into its shardings.

    The model is never whole on one device: its shapes come from ``nnx.eval_shape``, its
    shardings from the logical names of its variables, and it is created by ``jit`` with those
    ``out_shardings``. Call inside :func:`use`.

    Args:
      make: ``() -> nnx.Module``.
      mesh: the device mesh.
      init: ``(params, model_state) -> tree``, both pure dicts (``nnx.Param`` values and every
        other variable); e.g. a train state with optimizer moments. Default: ``params`` alone
        when the model has no other variables, else ``(params, model_state)``.
      init_shardings: ``(abstract tree, param shardings, model_state shardings) -> shardings``
        of ``init``'s tree. Required with ``init``.
      abstract: return ``jax.ShapeDtypeStruct`` s carrying the shardings (nothing is allocated),
        e.g. to restore a checkpoint into.

    Returns:
      ``(graphdef, tree, shardings)``; ``nnx.merge(graphdef, params[, model_state])`` rebuilds
      the model.
    """
    graphdef, abs_params, abs_rest = _split(nnx.eval_shape(make))

    def named(abs_state):
        return fit_shardings(
            nnx.to_pure_dict(abs_state), nnx.to_pure_dict(nnx.get_named_sharding(abs_state, mesh))
        )

    param_sh, rest_sh = named(abs_params), named(abs_rest)
    if init is None:
        if init_shardings is not None:
            raise ValueError("sharded_init: init_shardings needs init")
        has_rest = bool(jax.tree.leaves(nnx.to_pure_dict(abs_rest)))
        init = (lambda p, s: (p, s)) if has_rest else (lambda p, s: p)
        init_shardings = (lambda _, p, s: (p, s)) if has_rest else (lambda _, p, s: p)
    elif init_shardings is None:
        raise ValueError("sharded_init: init needs init_shardings")

    def build():
        _, params, rest = _split(make())
        return init(nnx.to_pure_dict(params), nnx.to_pure_dict(rest))

    abs_tree = jax.eval_shape(init, nnx.to_pure_dict(abs_params), nnx.to_pure_dict(abs_rest))
    shardings = init_shardings(abs_tree, param_sh, rest_sh)
    if abstract:
        return graphdef, abstract_like(abs_tree, shardings), shardings
    return graphdef, jax.jit(build, out_shardings=shardings)(), shardings


def batch_sharding(mesh: Mesh, names: tuple[str | None, ...], rules: str | Rules) -> NamedSharding:
    return NamedSharding(mesh, spec(names, resolve(mesh, rules)))


def put_batch(
    batch: dict[str, np.ndarray], mesh: Mesh, axes: dict[str, tuple], rules
) -> dict[str, jax.Array]:
    """Makes global arrays from this host's slice of a batch (multi-host safe).

    ``axes`` maps each key to its logical names (e.g. ``("batch", "length")``); keys not
    listed are sharded on their leading dimension over ``batch``.
    """
    pairs = resolve(mesh, rules)
    out = {}
    for k, v in batch.items():
        names = axes.get(k, ("batch",) + (None,) * (np.ndim(v) - 1))
        out[k] = jax.make_array_from_process_local_data(
            NamedSharding(mesh, spec(names, pairs)), np.asarray(v)
        )
    return out


def abstract_batch(
    shapes: dict[str, tuple[tuple[int, ...], Any]], mesh: Mesh, axes: dict[str, tuple], rules
) -> dict[str, jax.ShapeDtypeStruct]:
    """``jax.ShapeDtypeStruct`` s of a GLOBAL batch (``key -> (shape, dtype)``), sharded the way
    :func:`put_batch` shards the real one (ahead-of-time compiles: ``mlgen plan``)."""
    pairs = resolve(mesh, rules)
    out = {}
    for k, (shape, dtype) in shapes.items():
        names = axes.get(k, ("batch",) + (None,) * (len(shape) - 1))
        out[k] = jax.ShapeDtypeStruct(
            shape, dtype, sharding=NamedSharding(mesh, spec(names, pairs))
        )
    return out
