"""``mlgen.ops.moe_parallel``: routing and dispatch inside ``shard_map`` against the one-device
ops (``mlgen.ops.moe``): values and gradients to 1e-5 (float32) with the experts split over one
mesh axis and over two, both dispatch paths and both grouped-matmul impls; per-shard capacity
(GShard groups) when choices drop; the input errors. The layer on ``MeshConfig`` meshes is
tested in ``tests/nn/test_moe.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mlgen.ops import moe, moe_parallel

TOL = dict(rtol=1e-5, atol=1e-5)
K = 2


def _problem(B=8, T=3, D=8, F=12, E=8, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    w = (f(E, D, F) * D**-0.5, f(E, D, F) * D**-0.5, f(E, F, D) * F**-0.5)
    return f(B, T, D), f(D, E), *w


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _one_device(x, router, *w, dispatch, **kw):
    B, T, D = x.shape
    weights, experts, probs = moe.route((x @ router).reshape(B * T, -1), K, renormalize=True)
    xt = x.reshape(B * T, D)
    if dispatch == "capacity":
        y, stats = moe.capacity(xt, weights, experts, *w, capacity_factor=kw["capacity_factor"])
    else:
        y, stats = moe.dropless(xt, weights, experts, *w, impl=kw["impl"], block_size=4)
    stats = dict(stats, lb_loss=moe.load_balancing_loss(probs, experts))
    return y.reshape(B, T, D), stats


def _grads(fn, args):
    def loss(*a):
        y, stats = fn(*a)
        return jnp.sum(jnp.sin(y)) + stats["lb_loss"], (y, stats)

    return jax.jit(jax.value_and_grad(loss, argnums=range(len(args)), has_aux=True))(*args)


@pytest.mark.parametrize(
    "dispatch, impl, axes",
    [
        ("dropless", "blocked", ("expert",)),
        ("dropless", "ragged", ("expert",)),
        ("capacity", None, ("expert",)),
        ("dropless", "blocked", ("data", "expert")),
        ("capacity", None, ("data", "expert")),
    ],
    ids=lambda v: "+".join(v) if isinstance(v, tuple) else str(v),
)
def test_expert_parallel_matches_one_device_values_and_grads(dispatch, impl, axes):
    """Experts split over ``expert`` (4 shards, 2 experts each; tokens also over ``data``) or
    over both axes (8 shards, 1 expert each)."""
    args = _problem()
    mesh = _mesh((2, 4), ("data", "expert"))
    kw = dict(dispatch=dispatch, capacity_factor=4.0, impl=impl or "auto")
    (_, (want, stats_1)), g_1 = _grads(lambda *a: _one_device(*a, **kw), args)

    def sharded(x, router, *w):
        return moe_parallel.expert_parallel(
            x,
            router,
            *w,
            k=K,
            expert_axes=axes,
            batch_axes=("data", "expert"),
            block_size=4,
            **kw,
        )

    with jax.set_mesh(mesh):
        x = jax.device_put(args[0], NamedSharding(mesh, P(("data", "expert"))))
        w = [jax.device_put(a, NamedSharding(mesh, P(axes))) for a in args[2:]]
        (_, (y, stats)), g = _grads(sharded, (x, args[1], *w))
    np.testing.assert_allclose(y, want, **TOL)
    for a, b in zip(g, g_1):
        np.testing.assert_allclose(a, b, **TOL)
    np.testing.assert_array_equal(stats["tokens_per_expert"], stats_1["tokens_per_expert"])
    np.testing.assert_allclose(stats["lb_loss"], stats_1["lb_loss"], **TOL)
    assert int(stats["dropped"]) == 0


def test_capacity_is_per_shard_when_choices_drop():
    """GShard's groups: with a tight capacity each shard drops what the one-device capacity
    dispatch of its own tokens drops; the losses stay those of all tokens."""
    x, router, *w = _problem(B=4, T=6)
    mesh = _mesh((4,), ("expert",))
    mask = jnp.asarray(np.random.default_rng(1).random((4, 6)) > 0.25, jnp.float32)
    want, dropped, counts = [], 0, 0
    for b in range(4):  # shard b holds batch row b
        y_b, s_b = _one_device(x[b : b + 1], router, *w, dispatch="capacity", capacity_factor=0.5)
        want.append(y_b)
        dropped, counts = dropped + s_b["dropped"], counts + s_b["tokens_per_expert"]
    logits = x @ router
    _, experts, probs = moe.route(logits, K, renormalize=True)
    fn = jax.jit(
        lambda x, mask, router, *w: moe_parallel.expert_parallel(
            x,
            router,
            *w,
            k=K,
            mask=mask,
            expert_axes=("expert",),
            batch_axes=("expert",),
            dispatch="capacity",
            capacity_factor=0.5,
        )
    )
    with jax.set_mesh(mesh):
        y, stats = fn(x, mask, router, *w)
    np.testing.assert_allclose(y, jnp.concatenate(want), **TOL)
    assert int(stats["dropped"]) == int(dropped) > 0
    np.testing.assert_array_equal(stats["tokens_per_expert"], counts)
    np.testing.assert_allclose(
        stats["lb_loss"], moe.load_balancing_loss(probs, experts, mask), **TOL
    )
    np.testing.assert_allclose(stats["z_loss"], moe.router_z_loss(logits, mask), **TOL)


def test_input_errors():
    x, router, *w = _problem()
    mesh = _mesh((2, 4), ("data", "expert"))

    def call(router=router, w=w, batch_axes=("data", "expert"), **kw):
        return moe_parallel.expert_parallel(
            x, router, *w, k=K, mesh=mesh, batch_axes=batch_axes, **kw
        )

    with pytest.raises(ValueError, match=r"expert axes \('expert',\) must be among the axes"):
        call(expert_axes=("expert",), batch_axes=("data",))
    _, router6, *w6 = _problem(E=6)
    with pytest.raises(ValueError, match="E=6 is not divisible by the 4 shards"):
        call(router6, w6, expert_axes=("expert",))
    with pytest.raises(ValueError, match=r"dispatch must be dropless \| capacity"):
        call(expert_axes=("expert",), dispatch="dense")
    with pytest.raises(ValueError, match=r"mesh axes \['tensor'\] not in"):
        call(expert_axes=("tensor",))
