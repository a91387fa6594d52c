"""Dispatch, argument errors, auto selection and the log-sum-exp contract."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlgen.ops
from mlgen.ops.attention import (
    BACKENDS,
    BlockSizes,
    Problem,
    auto_order,
    blockwise,
    pallas_tpu,
    reference,
)

from .attention_test_base import fwd_and_grads, make_inputs


def _qkv(B=1, T=8, S=8, N=4, K=2, H=16):
    return jnp.ones((B, T, N, H)), jnp.ones((B, S, K, H)), jnp.ones((B, S, K, H))


@pytest.mark.parametrize(
    "kwargs,qkv,match",
    [
        (dict(), dict(N=4, K=3), r"q heads N=4 must be a multiple of k/v heads K=3"),
        (dict(sliding_window=0), dict(), r"sliding_window"),
        (dict(backend="flash"), dict(), r"backend='flash' is unknown"),
        (dict(backend="pallas_gpu"), dict(), r"pallas_gpu needs a GPU .*interpret=True"),
        (dict(backend="pallas_tpu"), dict(), r"pallas_tpu needs a TPU"),
        (dict(backend=("pallas_tpu", "pallas_gpu")), dict(), r"pallas_tpu: .*; pallas_gpu: "),
        (
            dict(segment_ids=jnp.zeros((1, 8), jnp.int32)),
            dict(T=4),
            r"segment_ids \[B, T\] needs T == S",
        ),
        (
            dict(segment_ids=jnp.zeros((1, 7), jnp.int32)),
            dict(),
            r"segment_ids must be integer arrays of shape",
        ),
    ],
)
def test_errors_name_the_argument(kwargs, qkv, match):
    with pytest.raises(ValueError, match=match):
        mlgen.ops.attention(*_qkv(**qkv), **kwargs)


def test_shape_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must be rank 4"):
        mlgen.ops.attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"k head dim H=8 must equal q head dim H=16"):
        mlgen.ops.attention(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match=r"share one dtype"):
        mlgen.ops.attention(q, k.astype(jnp.bfloat16), v)


def test_errors_before_compilation():
    q, k, v = _qkv(N=4, K=3)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        jax.jit(lambda q, k, v: mlgen.ops.attention(q, k, v)).lower(q, k, v)


def _problem(T, platform="cpu", interpret=False):
    return Problem(
        B=1,
        T=T,
        S=T,
        N=8,
        K=8,
        H=64,
        dtype=np.dtype("float32"),
        causal=True,
        has_segments=False,
        sliding_window=None,
        platform=platform,
        interpret=interpret,
    )


@pytest.mark.parametrize("interpret", [False, True])
def test_auto_on_cpu_never_picks_pallas(interpret):
    short, long = (
        auto_order(_problem(512, interpret=interpret)),
        auto_order(_problem(8192, interpret=interpret)),
    )
    assert short[0] == "xla" and long[0] == "blockwise"
    assert not any(n.startswith("pallas") for n in short + long)


def test_auto_on_accelerators_prefers_our_kernels():
    assert auto_order(_problem(4096, "tpu"))[0] == "pallas_tpu"
    assert auto_order(_problem(4096, "gpu"))[0] == "pallas_gpu"


def test_sequence_falls_through_to_a_backend_that_can_run():
    q, k, v, do, _ = make_inputs(B=1, T=12, S=12, N=2, K=1)
    got = mlgen.ops.attention(
        q, k, v, causal=True, backend=("pallas_tpu", "pallas_gpu", "blockwise")
    )
    np.testing.assert_allclose(got, reference.attention(q, k, v, causal=True), atol=1e-5)


def test_registry_is_one_line_to_extend():
    name = "test_only_backend"
    BACKENDS[name] = dataclasses.replace(BACKENDS["reference"], name=name)
    try:
        q, k, v = _qkv()
        np.testing.assert_allclose(
            mlgen.ops.attention(q, k, v, backend=name), reference.attention(q, k, v)
        )
    finally:
        del BACKENDS[name]


def test_lse_merge_of_key_halves_matches_full_attention():
    """What ring attention does: attend to key chunks separately, merge by log-sum-exp."""
    B, T, N, K = 2, 32, 4, 2
    q, k, v, do, _ = make_inputs(B=B, T=T, S=T, N=N, K=K, seed=3)
    half = T // 2

    def merged(q, k, v):
        # Global causal positions: queries 0..T-1, keys in two chunks; q_offset is traced.
        parts = [
            blockwise.attention_with_lse(
                q, k[:, i : i + half], v[:, i : i + half], causal=True, q_offset=jnp.int32(-i)
            )
            for i in (0, half)
        ]
        lse = jnp.logaddexp(parts[0][1], parts[1][1])
        lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return sum(jnp.exp(part_lse - lse_safe)[..., None] * o for o, part_lse in parts)

    want = fwd_and_grads(lambda q, k, v: reference.attention(q, k, v, causal=True), q, k, v, do)
    got = fwd_and_grads(merged, q, k, v, do)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=2e-5)


_VJP_BACKENDS = {
    "blockwise": (blockwise, {}),
    # The Mosaic interpreter on CPU; blocks must be multiples of 8 there (128 on a TPU).
    "pallas_tpu": (
        pallas_tpu,
        dict(
            interpret=True,
            block_sizes=BlockSizes(block_q=16, block_k=8, block_q_bwd=8, block_k_bwd=8),
        ),
    ),
}


@pytest.mark.parametrize("name", list(_VJP_BACKENDS))
def test_vjp_from_global_lse_of_key_halves_matches_full_attention_grads(name):
    """What ring attention's backward does: each key chunk's flash backward from
    the global out / lse.

    The chunks here are the two halves of one causal sequence: the first is fully visible to
    the second half's queries (called non-causal), the second is the causal diagonal block,
    as the ring calls a local backend that takes no traced query offset.
    """
    mod, kw = _VJP_BACKENDS[name]
    B, T, N, K = 2, 32, 4, 2
    q, k, v, do, _ = make_inputs(B=B, T=T, S=T, N=N, K=K, seed=4)
    seg = jnp.asarray(
        [[0] * 10 + [1] * 22, [0] * 24 + [1] * 8], jnp.int32
    )  # documents straddle the halves
    h = T // 2
    want = fwd_and_grads(
        lambda q, k, v: reference.attention(q, k, v, causal=True, segment_ids=seg), q, k, v, do
    )
    out, lse = blockwise.attention_with_lse(q, k, v, causal=True, segment_ids=seg)
    # Query half i against key half j: (i, j) = (0, 0) and (1, 1) causal diagonals, (1, 0) full.
    dq, dk, dv = jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
    blocks = {}
    for i, j, causal in ((0, 0, True), (1, 0, False), (1, 1, True)):
        qs, ks = slice(i * h, (i + 1) * h), slice(j * h, (j + 1) * h)
        g = blocks[i, j] = mod.attention_vjp_with_lse(
            q[:, qs],
            k[:, ks],
            v[:, ks],
            out[:, qs],
            lse[:, qs],
            do[:, qs],
            causal=causal,
            segment_ids=(seg[:, qs], seg[:, ks]),
            **kw,
        )
        dq, dk, dv = dq.at[:, qs].add(g[0]), dk.at[:, ks].add(g[1]), dv.at[:, ks].add(g[2])
    np.testing.assert_allclose(out, want[0], atol=2e-5)
    for got, w in zip((dq, dk, dv), want[1:]):
        np.testing.assert_allclose(got, w, atol=2e-5)
    # The off-diagonal block really contributes: the test would notice it dropped.
    assert float(jnp.abs(blocks[1, 0][0]).max()) > 1e-2


def test_vjp_from_global_lse_gives_zero_grads_to_rows_that_see_nothing():
    q, k, v, do, (qid, kid) = make_inputs(B=1, T=24, S=33, N=2, K=1, segments="pair", seed=5)
    want = fwd_and_grads(
        lambda q, k, v: reference.attention(q, k, v, segment_ids=(qid, kid)), q, k, v, do
    )
    out, lse = blockwise.attention_with_lse(q, k, v, segment_ids=(qid, kid))
    assert bool(jnp.any(jnp.isinf(lse)))  # queries with id 3 see no key
    cut = 17
    parts = [
        blockwise.attention_vjp_with_lse(
            q, k[:, a:b], v[:, a:b], out, lse, do, segment_ids=(qid, kid[:, a:b])
        )
        for a, b in ((0, cut), (cut, 33))
    ]
    np.testing.assert_allclose(parts[0][0] + parts[1][0], want[1], atol=2e-5)
    np.testing.assert_allclose(jnp.concatenate([parts[0][1], parts[1][1]], 1), want[2], atol=2e-5)
    np.testing.assert_allclose(jnp.concatenate([parts[0][2], parts[1][2]], 1), want[3], atol=2e-5)


def test_lse_matches_reference_logsumexp():
    q, k, v, _, _ = make_inputs(B=1, T=20, S=20, N=2, K=1)
    _, lse = blockwise.attention_with_lse(q, k, v, causal=True)
    logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, 2, axis=2)) * 16**-0.5
    logits = jnp.where(jnp.tril(jnp.ones((20, 20), bool)), logits, -jnp.inf)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(logits, axis=-1).transpose(0, 2, 1), atol=1e-5)
