"""The Infini-attention layer: SelfAttention's parameters plus the gate ``beta``; one segment is
SelfAttention; cached decoding (a left-padded prompt, then token by token) equals the full
forward of each row at every step; gradients flow; bad arguments are one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgen.nn.attention import SelfAttention
from mlgen.nn.infini import InfiniAttention

D, N, K, H = 16, 4, 2, 8


def _layer(segment_len=4, delta_rule=False, seed=0, **kw):
    layer = InfiniAttention(
        D, N, K, H, segment_len=segment_len, delta_rule=delta_rule, rngs=nnx.Rngs(seed), **kw
    )
    layer.beta[...] = jax.random.normal(jax.random.key(seed + 1), (N,))
    return layer


def _x(B, T, seed=3):
    return jax.random.normal(jax.random.key(seed), (B, T, D))


def _pos(B, T):
    return jnp.broadcast_to(jnp.arange(T), (B, T))


def _params(m):
    return nnx.to_pure_dict(nnx.state(m, nnx.Param))


def test_parameters_are_self_attention_s_plus_beta():
    inf = _layer(lora=None)
    sa = SelfAttention(D, N, K, H, rngs=nnx.Rngs(0))
    pi, ps = _params(inf), _params(sa)
    assert set(pi) == set(ps) | {"beta"}
    for name in ps:
        for leaf in ps[name]:
            np.testing.assert_array_equal(pi[name][leaf], ps[name][leaf])
    assert inf.beta.out_sharding == ("heads",) and inf.beta[...].shape == (N,)


def test_one_segment_with_a_closed_gate_is_self_attention():
    """With segment_len >= T and sigmoid(beta) = 0 the layer is SelfAttention (same weights):
    values, and gradients for every shared parameter and the input."""
    inf, sa = _layer(segment_len=8), SelfAttention(D, N, K, H, rngs=nnx.Rngs(0))
    inf.beta[...] = jnp.full((N,), -1e4)
    x, pos = _x(2, 8), _pos(2, 8)
    np.testing.assert_allclose(
        np.asarray(inf(x, positions=pos)), np.asarray(sa(x, positions=pos)), atol=1e-5
    )

    def grads(m):
        gdef, params = nnx.split(m, nnx.Param)

        def loss(params, x):
            return jnp.sum(jnp.sin(nnx.merge(gdef, params)(x, positions=pos)))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    (gi, gxi), (gs, gxs) = grads(inf), grads(sa)
    np.testing.assert_allclose(np.asarray(gxi), np.asarray(gxs), atol=1e-5)
    gi, gs = nnx.to_pure_dict(gi), nnx.to_pure_dict(gs)
    for name in gs:
        for leaf in gs[name]:
            np.testing.assert_allclose(gi[name][leaf], gs[name][leaf], atol=1e-5)
    assert np.abs(np.asarray(gs["q"]["kernel"])).max() > 0


@pytest.mark.parametrize(
    "delta_rule,window", [(False, None), (True, None), (True, 3)], ids=["linear", "delta", "window"]
)
def test_decode_equals_forward_at_every_step(delta_rule, window):
    """Three rows with 3, 6 and 9 real prompt tokens (left-padded to 9), then 6 tokens one at a
    time: each row crosses segment boundaries (segment_len 4) at its own steps. At every step
    the decoded outputs equal ``__call__`` on that row's real tokens."""
    layer = _layer(segment_len=4, delta_rule=delta_rule, sliding_window=window)
    P, steps, lens = 9, 6, (3, 6, 9)
    xs = _x(3, P + steps)
    # Row b: its real tokens are xs[b, P - lens[b]:]; positions -pad..-1 (padding), 0, 1, ...
    positions = jnp.stack([jnp.arange(P + steps) - (P - n) for n in lens])
    full = jax.jit(lambda x: layer(x, positions=_pos(1, x.shape[1])))
    want = [np.asarray(full(xs[b : b + 1, P - n :]))[0] for b, n in enumerate(lens)]

    run = jax.jit(lambda x, p, c: layer.decode(x, p, c))
    cache = layer.init_cache(3, P + steps)
    got, cache = run(xs[:, :P], positions[:, :P], cache)
    for b, n in enumerate(lens):
        np.testing.assert_allclose(np.asarray(got)[b, P - n :], want[b][:n], atol=1e-5)
    for t in range(P, P + steps):
        got, cache = run(xs[:, t : t + 1], positions[:, t : t + 1], cache)
        for b, n in enumerate(lens):
            np.testing.assert_allclose(np.asarray(got)[b, 0], want[b][t - (P - n)], atol=1e-5)
    assert cache.k.shape == (3, K, 4, H)  # O(segment_len), whatever the context


def test_prompt_in_pieces_equals_one_prompt():
    """T > 1 tokens on a cache that already holds some (a prompt fed in two calls)."""
    layer = _layer(segment_len=3, delta_rule=True)
    x, pos = _x(2, 10), _pos(2, 10)
    run = jax.jit(lambda x, p, c: layer.decode(x, p, c))
    one, _ = run(x, pos, layer.init_cache(2, 10))
    a, cache = run(x[:, :4], pos[:, :4], layer.init_cache(2, 10))
    b, _ = run(x[:, 4:], pos[:, 4:], cache)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([a, b], 1)), np.asarray(one), atol=1e-5)
    np.testing.assert_allclose(np.asarray(one), np.asarray(layer(x, positions=pos)), atol=1e-5)


def test_grad_reaches_the_gate_and_the_memory():
    layer = _layer(segment_len=2)
    gdef, params = nnx.split(layer, nnx.Param)
    x, pos = _x(2, 7), _pos(2, 7)

    def loss(params):
        return jnp.mean(nnx.merge(gdef, params)(x, positions=pos) ** 2)

    g = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
    assert np.all(np.isfinite(np.asarray(g["beta"]))) and np.abs(np.asarray(g["beta"])).min() > 0
    assert np.abs(np.asarray(g["k"]["kernel"])).max() > 0


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_segment_len_is_one_line(bad):
    with pytest.raises(ValueError, match=r"^segment_len: must be a positive int") as e:
        InfiniAttention(D, N, K, H, segment_len=bad, rngs=nnx.Rngs(0))
    assert "\n" not in str(e.value)


def test_non_causal_call_is_refused():
    with pytest.raises(ValueError, match=r"^causal: "):
        _layer()(_x(1, 4), positions=_pos(1, 4), causal=False)
