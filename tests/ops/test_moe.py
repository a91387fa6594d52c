"""``mlgen.ops.moe``: routing, auxiliary losses and both dispatch paths against their specs.

The spec of dispatch is a per-token loop over the token's top-k experts; every path (dropless
with ragged_dot, dropless sort + dense blocks at several block sizes, capacity with room for
every choice) matches it in values and gradients (through the routing, w.r.t. the tokens, the
router and the three stacked expert weights) to 1e-5 in float32. Dropping, the
load-balancing loss and the z-loss are checked on hand examples. What this does not cover:
running ragged_dot's TPU / GPU lowering (only that ``auto`` picks it when lowering for TPU).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the TPU test only lowers

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mlgen.ops import moe  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def _problem(T=13, D=8, F=12, E=4, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return (f(T, D), f(D, E), f(E, D, F) * D**-0.5, f(E, D, F) * D**-0.5, f(E, F, D) * F**-0.5)


def _expert(x, wg, wu, wd):
    return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd


def _loop(x, weights, experts, wg, wu, wd, keep=None):
    """The spec: each token's output is the weighted sum of its (kept) top-k experts.

    One token at a time (``vmap`` of the per-token function: a Python loop compiled 5x slower).
    """
    keep = jnp.ones(experts.shape, bool) if keep is None else jnp.asarray(keep)

    def token(xt, wt, et, kt):
        y = jnp.zeros_like(xt)
        for j in range(et.shape[0]):
            e = et[j]
            y = y + jnp.where(kt[j], wt[j], 0.0) * _expert(xt, wg[e], wu[e], wd[e])
        return y

    return jax.vmap(token)(x, weights, experts, keep)


def _path(name):
    if name == "capacity":  # capacity_factor E / k: room for every choice whatever the routing
        return lambda *a, E, k: moe.capacity(*a, capacity_factor=E / k)
    impl, _, b = name.partition("-")
    return lambda *a, E, k: moe.dropless(*a, impl=impl, block_size=int(b or 128))


@pytest.mark.parametrize(
    "path, k",
    [(p, 2) for p in ("ragged", "blocked-1", "blocked-4", "blocked-128", "capacity")]
    + [("blocked-4", 1)],
)
def test_dispatch_matches_per_token_loop_values_and_grads(path, k):
    args = _problem()
    E = args[1].shape[1]
    dispatch = _path(path)

    def routed(x, wr):
        return moe.route(x @ wr, k, renormalize=True)[:2]

    # The loop's expert ids come from the same routing (ids carry no gradient).
    experts = routed(*args[:2])[1]

    def loss_path(x, wr, wg, wu, wd):
        w, e = routed(x, wr)
        y, _ = dispatch(x, w, e, wg, wu, wd, E=E, k=k)
        return jnp.sum(jnp.sin(y)), y

    def loss_loop(x, wr, wg, wu, wd):
        w, _ = routed(x, wr)
        y = _loop(x, w, experts, wg, wu, wd)
        return jnp.sum(jnp.sin(y)), y

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=range(5), has_aux=True))  # noqa: E731
    (_, y), g = grad(loss_path)(*args)
    (_, y_ref), g_ref = grad(loss_loop)(*args)
    np.testing.assert_allclose(y, y_ref, **TOL)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, **TOL)


def test_dispatch_stats():
    x, wr, *w = _problem()
    weights, experts, _ = moe.route(x @ wr, 2, renormalize=True)
    counts = np.bincount(np.asarray(experts).ravel(), minlength=4)
    y_d, s_d = jax.jit(moe.dropless)(x, weights, experts, *w)
    y_c, s_c = jax.jit(lambda *a: moe.capacity(*a, capacity_factor=2.0))(x, weights, experts, *w)
    np.testing.assert_array_equal(s_d["tokens_per_expert"], counts)
    np.testing.assert_array_equal(s_c["tokens_per_expert"], counts)
    assert int(s_d["dropped"]) == 0 and int(s_c["dropped"]) == 0
    np.testing.assert_allclose(y_c, y_d, **TOL)


def test_capacity_drops_the_choices_past_capacity_lowest_rank_first():
    x, _, *w = _problem(T=4, E=3)
    # 4 tokens x 2 choices over 3 experts; capacity ceil(0.75 * 4 * 2 / 3) = 2 per expert.
    experts = jnp.array([[0, 1], [0, 2], [0, 1], [1, 0]], jnp.int32)
    weights = jnp.array([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.8, 0.2]], jnp.float32)
    assert moe.capacity_of(4, 2, 3, 0.75) == 2
    # First choices take slots first: expert 0 gets tokens 0, 1 (token 2's first choice is
    # dropped), expert 1 token 3. Then second choices: expert 1 takes token 0 and is full
    # (token 2's second choice dropped); expert 2 takes token 1; expert 0 is full (token 3's).
    keep = [[True, True], [True, True], [False, False], [True, False]]
    slot, counts = moe.capacity_slots(experts, 3, 2)
    np.testing.assert_array_equal(slot, [[0, 3], [1, 4], [6, 6], [2, 6]])
    np.testing.assert_array_equal(counts, [4, 3, 1])
    y, stats = jax.jit(moe.capacity, static_argnames="capacity_factor")(
        x, weights, experts, *w, capacity_factor=0.75
    )
    assert int(stats["dropped"]) == 3
    np.testing.assert_array_equal(stats["tokens_per_expert"], [4, 3, 1])
    want = jax.jit(lambda x, *w: _loop(x, weights, experts, *w, keep=keep))(x, *w)
    np.testing.assert_allclose(y, want, **TOL)
    np.testing.assert_array_equal(y[2], 0.0)  # both of token 2's choices were dropped


def test_grouped_swiglu_rows_past_the_groups_are_zero_and_impls_agree():
    xs, _, wg, wu, wd = _problem(T=14)
    group_sizes = jnp.array([3, 0, 6, 1], jnp.int32)  # 10 of 14 rows; an empty group
    ys = {
        impl: jax.jit(lambda *a, impl=impl: moe.grouped_swiglu(*a, impl=impl, block_size=4))(
            xs, group_sizes, wg, wu, wd
        )
        for impl in ("ragged", "blocked")
    }
    ref = [_expert(xs[i], wg[e], wu[e], wd[e]) for i, e in enumerate([0, 0, 0] + [2] * 6 + [3])]
    for y in ys.values():
        np.testing.assert_allclose(y[:10], jnp.stack(ref), **TOL)
        np.testing.assert_array_equal(y[10:], 0.0)


def test_route_scores_and_renormalisation():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 1.0]])
    w, e, p = moe.route(logits, 2, score="softmax", renormalize=False)
    soft = jax.nn.softmax(logits, axis=-1)
    np.testing.assert_array_equal(e, [[0, 1], [1, 2]])
    np.testing.assert_allclose(w, [[soft[0, 0], soft[0, 1]], [soft[1, 1], soft[1, 2]]], **TOL)
    np.testing.assert_allclose(p, soft, **TOL)
    w_n, _, _ = moe.route(logits, 2, score="softmax", renormalize=True)
    np.testing.assert_allclose(w_n, w / w.sum(-1, keepdims=True), **TOL)
    # Mixtral: softmax over all experts then renormalised top-k == softmax over the top-k logits
    np.testing.assert_allclose(w_n[0], jax.nn.softmax(jnp.array([2.0, 1.0])), **TOL)
    w_s, e_s, p_s = moe.route(logits, 2, score="sigmoid", renormalize=False)
    np.testing.assert_array_equal(e_s, e)
    np.testing.assert_allclose(w_s[0], jax.nn.sigmoid(jnp.array([2.0, 1.0])), **TOL)
    sig = jax.nn.sigmoid(logits)
    np.testing.assert_allclose(p_s, sig / sig.sum(-1, keepdims=True), **TOL)
    with pytest.raises(ValueError, match="k=5 must be in"):
        moe.route(logits, 5, renormalize=True)


def test_load_balancing_loss_on_a_hand_example():
    probs = jnp.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    experts = jnp.array([[0], [0], [1], [0]], jnp.int32)
    # f = (3/4, 1/4), P = (2.4/4, 1.6/4): 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1
    np.testing.assert_allclose(moe.load_balancing_loss(probs, experts), 1.1, **TOL)
    # token 3 masked out: f = (2/3, 1/3), P = (1.7/3, 1.3/3)
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(
        moe.load_balancing_loss(probs, experts, mask), 2 * (2 * 1.7 + 1.3) / 9, **TOL
    )
    # k = 2 over 3 experts: f counts both choices (sums to k); balanced routing gives k.
    probs3 = jnp.full((3, 3), 1 / 3)
    experts3 = jnp.array([[0, 1], [1, 2], [2, 0]], jnp.int32)
    np.testing.assert_allclose(moe.load_balancing_loss(probs3, experts3), 2.0, **TOL)
    # The gradient reaches the router through P only: d/dP_e = E * f_e / T per token.
    g = jax.grad(moe.load_balancing_loss)(probs, experts)
    np.testing.assert_allclose(g, jnp.broadcast_to(2 * jnp.array([0.75, 0.25]) / 4, (4, 2)), **TOL)


def test_router_z_loss_on_a_hand_example():
    logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: log 2, log 4
    want = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    np.testing.assert_allclose(moe.router_z_loss(logits), want, **TOL)
    mask = jnp.array([0.0, 1.0])
    np.testing.assert_allclose(moe.router_z_loss(logits, mask), math.log(4.0) ** 2, **TOL)


def test_load_balancing_loss_matches_transformers():
    torch = pytest.importorskip("torch")
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    rng = np.random.default_rng(1)
    B, T, E, k = 2, 9, 5, 2
    logits = rng.standard_normal((B * T, E)).astype(np.float32)
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    _, experts, probs = moe.route(jnp.asarray(logits), k, renormalize=True)
    for m in (None, mask):
        want = mixtral.load_balancing_loss_func(
            (torch.from_numpy(logits),),
            E,
            k,
            None if m is None else torch.from_numpy(m),
        )
        got = moe.load_balancing_loss(probs, experts, None if m is None else m.reshape(-1))
        np.testing.assert_allclose(got, float(want), **TOL)


def test_dispatch_runs_per_shard_under_shard_map():
    """Each of 8 devices routes and dispatches its own tokens (what an expert-parallel layer
    builds on); dispatch is per token, so the result is the global one."""
    from jax.sharding import PartitionSpec as P

    x, wr, *w = _problem(T=32)
    weights, experts, _ = moe.route(x @ wr, 2, renormalize=True)
    want = jax.jit(moe.dropless)(x, weights, experts, *w)[0]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    for path in ("ragged", "blocked-4", "capacity"):
        dispatch = _path(path)

        def local(x, wr, *w):
            weights, experts, _ = moe.route(x @ wr, 2, renormalize=True)
            y, stats = dispatch(x, weights, experts, *w, E=4, k=2)
            return y, jax.lax.psum(stats["dropped"], "data")

        per_shard = jax.shard_map(
            local, mesh=mesh, in_specs=(P("data"),) + (P(),) * 4, out_specs=(P("data"), P())
        )
        y, dropped = jax.jit(per_shard)(x, wr, *w)
        np.testing.assert_allclose(y, want, **TOL)
        assert int(dropped) == 0


def test_auto_picks_blocked_on_cpu_and_ragged_when_lowering_for_tpu():
    x, wr, *w = _problem()
    weights, experts, _ = moe.route(x @ wr, 2, renormalize=True)

    def f(x, *w):
        return moe.dropless(x, weights, experts, *w)[0]

    assert "ragged_dot" not in str(jax.make_jaxpr(f)(x, *w))
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    from jax.sharding import AxisType, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    mesh = Mesh(np.array(topo.devices).reshape(4), ("data",), axis_types=(AxisType.Auto,))
    sh = NamedSharding(mesh, P())
    abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh) for a in (x, *w)]
    lowered = jax.jit(f).lower(*abstract).as_text()
    assert "chlo.ragged_dot" in lowered  # XLA's grouped matmul (TPU lowers it natively)
