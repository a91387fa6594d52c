"""Infini-attention ops: the segment-parallel training form (one ``lax.scan`` over segments)
equals the per-segment reference loop (linear and delta-rule memory, odd lengths, GQA, packed
rows), values and gradients; one segment is causal attention; the memory of packed rows is an
independent masked linear attention; padding contributes nothing; bad arguments are one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlgen.ops import infini
from mlgen.ops.attention import AttentionConfig, attention

TOL = dict(atol=1e-5, rtol=1e-5)
# Jitted once per static configuration: eager calls compile every small op (slow on 2 cores).
_infini = jax.jit(
    infini.infini_attention, static_argnames=("segment_len", "delta_rule", "sliding_window")
)
_update = jax.jit(infini.update, static_argnames=("delta_rule",))


def _inputs(B=2, T=13, N=4, K=2, H=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, T, K, H))
    v = jax.random.normal(ks[2], (B, T, K, H))
    beta = jax.random.normal(ks[3], (N,))
    return q, k, v, beta


def _grads(fn, q, k, v, beta, **kw):
    """Gradients of a random projection of the output w.r.t. (q, k, v, beta)."""
    w = jax.random.normal(jax.random.key(9), q.shape)
    grad = jax.grad(lambda *a: jnp.sum(fn(*a, **kw) * w), argnums=(0, 1, 2, 3))
    return jax.jit(grad)(q, k, v, beta)


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


PACKED = np.array(
    [
        [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 0],  # a document change mid-segment, right padding
        [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # left padding
    ],
    np.int32,
)


@pytest.mark.parametrize(
    "delta_rule,N,K,T,L,packed",
    [
        # MHA / MQA without segment ids: kept out of the default run (CPU time).
        pytest.param(False, 2, 2, 9, 3, False, marks=pytest.mark.slow),
        pytest.param(True, 4, 1, 11, 5, False, marks=pytest.mark.slow),
        (False, 4, 2, 13, 4, True),
        (True, 4, 2, 13, 3, True),
    ],
)
def test_chunked_equals_per_segment_reference(delta_rule, N, K, T, L, packed):
    q, k, v, beta = _inputs(T=T, N=N, K=K)
    kw = dict(segment_len=L, delta_rule=delta_rule)
    if packed:
        kw["segment_ids"] = jnp.asarray(PACKED[:, :T])
    want = jax.jit(lambda *a: infini.infini_reference(*a, **kw))(q, k, v, beta)
    got = jax.jit(lambda *a: infini.infini_attention(*a, **kw))(q, k, v, beta)
    _close(got, want)
    # The memory matters here (not just local attention): one long segment gives other numbers.
    other = _infini(q, k, v, beta, **{**kw, "segment_len": T})
    assert np.abs(np.asarray(want - other)).max() > 1e-2
    _close(
        _grads(infini.infini_attention, q, k, v, beta, **kw),
        _grads(infini.infini_reference, q, k, v, beta, **kw),
    )


def test_one_segment_is_causal_attention():
    q, k, v, beta = _inputs(T=7)
    g = jax.nn.sigmoid(beta)[:, None]

    def want(q, k, v, beta):
        return (1 - jax.nn.sigmoid(beta)[:, None]) * attention(q, k, v, causal=True)

    for L in (7, 32):  # segment_len == T and > T
        got = _infini(q, k, v, beta, segment_len=L)
        np.testing.assert_allclose(
            np.asarray(got), np.asarray((1 - g) * attention(q, k, v, causal=True)), **TOL
        )
    _close(
        _grads(infini.infini_attention, q, k, v, beta, segment_len=32), _grads(want, q, k, v, beta)
    )
    # A closed gate (sigmoid(beta) = 0) is exactly causal attention.
    shut = jnp.full_like(beta, -1e4)
    np.testing.assert_allclose(
        np.asarray(_infini(q, k, v, shut, segment_len=7)),
        np.asarray(attention(q, k, v, causal=True)),
        **TOL,
    )


def _masked_linear_spec(q, k, v, beta, ids, L):
    """Independent spec of the packed-row memory: a query reads every token of ITS document in
    earlier segments, as one masked linear attention over the whole row (O(T^2))."""
    B, T, N, H = q.shape
    K = k.shape[2]
    f = lambda x: jax.nn.elu(x) + 1  # noqa: E731
    seg = jnp.arange(T) // L
    w = (seg[None, None, :] < seg[None, :, None]) & (ids[:, :, None] == ids[:, None, :])
    w = w & (ids[:, None, :] != 0) & (ids[:, :, None] != 0)  # [B, t, u]
    qg = f(q).reshape(B, T, K, N // K, H)
    a = jnp.einsum("btkgh,bukh->bkgtu", qg, f(k)) * w[:, None, None]
    num = jnp.einsum("bkgtu,bukh->btkgh", a, v).reshape(B, T, N, H)
    den = a.sum(-1).transpose(0, 3, 1, 2).reshape(B, T, N)[..., None]
    a_mem = jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)
    local = (seg[:, None] == seg[None, :])[None] & (ids[:, :, None] == ids[:, None, :])
    local = local & (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None]
    logits = jnp.einsum("btkgh,bukh->bkgtu", q.reshape(B, T, K, N // K, H), k) * H**-0.5
    logits = jnp.where(local[:, None, None], logits, -jnp.inf)
    a_dot = jnp.einsum("bkgtu,bukh->btkgh", jax.nn.softmax(logits, -1), v).reshape(B, T, N, H)
    g = jax.nn.sigmoid(beta)[:, None]
    return g * a_mem + (1 - g) * a_dot


def test_packed_linear_memory_is_masked_linear_attention():
    q, k, v, beta = _inputs(T=13)
    ids = jnp.asarray(
        [[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]],
        jnp.int32,
    )
    got = _infini(q, k, v, beta, segment_len=4, segment_ids=ids)
    _close(got, jax.jit(_masked_linear_spec, static_argnums=5)(q, k, v, beta, ids, 4))


def test_packed_documents_on_segment_boundaries_are_separate_rows():
    """Two documents packed at a segment boundary: each gets what it gets alone (delta rule)."""
    q, k, v, beta = _inputs(B=1, T=12)
    ids = jnp.asarray([[1] * 8 + [2] * 4], jnp.int32)
    kw = dict(segment_len=4, delta_rule=True)
    got = _infini(q, k, v, beta, segment_ids=ids, **kw)
    first = _infini(q[:, :8], k[:, :8], v[:, :8], beta, **kw)
    second = _infini(q[:, 8:], k[:, 8:], v[:, 8:], beta, **kw)
    _close(got, jnp.concatenate([first, second], axis=1))


@pytest.mark.parametrize("delta_rule", [False, True])
def test_padding_contributes_nothing(delta_rule):
    q, k, v, beta = _inputs(T=13)
    ids = jnp.asarray(PACKED)
    pad = ids == 0
    kw = dict(segment_len=4, delta_rule=delta_rule, segment_ids=ids)
    noise = jax.random.normal(jax.random.key(5), k.shape) * 10
    k2 = jnp.where(pad[..., None, None], noise, k)
    v2 = jnp.where(pad[..., None, None], -noise, v)
    a = _infini(q, k, v, beta, **kw)
    b = _infini(q, k2, v2, beta, **kw)
    real = ~np.asarray(pad)
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], **TOL)
    # No gradient reaches a padding token's key or value from the real tokens' outputs.
    w = jnp.where(pad[..., None, None], 0.0, jax.random.normal(jax.random.key(2), q.shape))
    gk, gv = jax.grad(lambda k, v: jnp.sum(_infini(q, k, v, beta, **kw) * w), argnums=(0, 1))(k, v)
    assert np.abs(np.asarray(gk)[~real]).max() == 0 and np.abs(np.asarray(gv)[~real]).max() == 0
    assert np.abs(np.asarray(gk)[real]).max() > 0


def test_local_attention_runs_on_any_backend():
    q, k, v, beta = _inputs(T=13)
    ids = jnp.asarray(PACKED)
    kw = dict(segment_len=4, segment_ids=ids, sliding_window=3)
    want = jax.jit(lambda *a: infini.infini_reference(*a, **kw))(q, k, v, beta)
    for backend in ("xla", "blockwise"):
        cfg = AttentionConfig(backend=backend)
        got = jax.jit(lambda *a: infini.infini_attention(*a, **kw, config=cfg))(q, k, v, beta)  # noqa: B023
        _close(got, want)


def test_empty_memory_reads_zero_and_update_skips_weightless_tokens():
    B, L, K, G, H = 2, 3, 2, 2, 4
    mem, z = jnp.zeros((B, K, H, H)), jnp.zeros((B, K, H))
    sq = infini.feature(jax.random.normal(jax.random.key(0), (B, L, K, G, H)))
    assert np.all(np.asarray(infini.retrieve(sq, mem, z)) == 0)
    sk = infini.feature(jax.random.normal(jax.random.key(1), (B, L, K, H)))
    v = jax.random.normal(jax.random.key(2), (B, L, K, H))
    weight = jnp.asarray([[1, 0, 1], [0, 0, 0]], jnp.float32)
    for delta in (False, True):
        m, zz = _update(mem, z, sk, v, weight, delta_rule=delta)
        want = jnp.einsum("lkh,lkv->khv", sk[0, ::2], v[0, ::2])  # empty memory: delta = linear
        np.testing.assert_allclose(np.asarray(m[0]), np.asarray(want), **TOL)
        assert np.all(np.asarray(m[1]) == 0) and np.all(np.asarray(zz[1]) == 0)
    # Delta rule: a value the memory already retrieves exactly adds nothing.
    m, zz = _update(mem, z, sk[:, :1], v[:, :1], jnp.ones((B, 1)), delta_rule=True)
    m2, _ = _update(m, zz, sk[:, :1], v[:, :1], jnp.ones((B, 1)), delta_rule=True)
    np.testing.assert_allclose(np.asarray(m2), np.asarray(m), atol=1e-5)
    m3, _ = _update(m, zz, sk[:, :1], v[:, :1], jnp.ones((B, 1)), delta_rule=False)
    assert np.abs(np.asarray(m3 - m)).max() > 1e-2


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
def test_bad_segment_len_is_one_line(bad):
    q, k, v, beta = _inputs(T=5)
    for fn in (infini.infini_attention, infini.infini_reference):
        with pytest.raises(ValueError, match=r"^segment_len: must be a positive int") as e:
            fn(q, k, v, beta, segment_len=bad)
        assert "\n" not in str(e.value)


def test_bad_shapes_name_the_argument():
    q, k, v, beta = _inputs(T=5)
    with pytest.raises(ValueError, match=r"^beta: expected shape \(4,\)"):
        infini.infini_attention(q, k, v, beta[:2], segment_len=2)
    with pytest.raises(ValueError, match=r"^segment_ids: expected shape"):
        infini.infini_attention(q, k, v, beta, segment_len=2, segment_ids=jnp.ones((2, 4), int))
    with pytest.raises(ValueError, match=r"^k, v:"):
        infini.infini_attention(q, k[:, :, :, :4], v[:, :, :, :4], beta, segment_len=2)
