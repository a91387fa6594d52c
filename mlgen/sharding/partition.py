"""Logical names -> shardings: sharded init, activation constraints, batch placement."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlgen.sharding.rules import check_names, get_rules


@contextlib.contextmanager
def use(mesh: Mesh, rules: str | tuple):
    """Activates ``mesh`` and the logical-axis ``rules`` (a preset name or pairs)."""
    pairs = get_rules(rules) if isinstance(rules, str) else rules
    with jax.set_mesh(mesh), flax.core.spmd.logical_axis_rules(pairs):
        yield


def _current_rules() -> tuple:
    return tuple(flax.core.spmd.get_logical_axis_rules())


def spec(names: tuple[str | None, ...], rules: tuple | None = None) -> P:
    """PartitionSpec of logical ``names`` under ``rules`` (default: the active ones)."""
    check_names(names)
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


def sharded_init(make: Callable[[], nnx.Module], mesh: Mesh) -> tuple[nnx.GraphDef, Any, Any]:
    """Initialises a model directly into its shardings (never whole on one device).

    Call inside :func:`use`. Returns ``(graphdef, params, shardings)`` where ``params`` is
    the pure nested dict of the model's ``nnx.Param`` values and ``shardings`` its tree of
    ``NamedSharding``.
    """
    abstract = nnx.eval_shape(make)
    graphdef, abs_state = nnx.split(abstract, nnx.Param)
    shardings = fit_shardings(nnx.to_pure_dict(abs_state), nnx.to_pure_dict(nnx.get_named_sharding(abs_state, mesh)))

    def init():
        return nnx.to_pure_dict(nnx.split(make(), nnx.Param)[1])

    params = jax.jit(init, out_shardings=shardings)()
    return graphdef, params, shardings


def batch_sharding(mesh: Mesh, names: tuple[str | None, ...], rules: str | tuple) -> NamedSharding:
    pairs = get_rules(rules) if isinstance(rules, str) else rules
    return NamedSharding(mesh, spec(names, pairs))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, axes: dict[str, tuple], rules) -> dict[str, jax.Array]:
    """Makes global arrays from this host's slice of a batch (multi-host safe).

    ``axes`` maps each key to its logical names (e.g. ``("batch", "length")``); keys not
    listed are sharded on their leading dimension over ``batch``.
    """
    out = {}
    for k, v in batch.items():
        names = axes.get(k, ("batch",) + (None,) * (np.ndim(v) - 1))
        sh = batch_sharding(mesh, names, rules)
        out[k] = jax.make_array_from_process_local_data(sh, np.asarray(v))
    return out
