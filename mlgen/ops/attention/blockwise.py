"""Blockwise attention in plain JAX: online softmax over key blocks, O(T*H) memory.

Forward: for each query block, a ``fori_loop`` over only the key blocks that the mask lets
it see (causal / sliding-window block skipping), keeping the running max, sum and output.
Backward (``custom_vjp``): one pass over key blocks; for each, a loop over the query blocks
that can see it recomputes the probabilities from the saved log-sum-exp and accumulates
dK/dV for the block and dQ into a carried ``[T, H]`` buffer. No ``[T, S]`` array exists.

``attention_with_lse`` also returns the per-row log-sum-exp and is differentiable in both
outputs; ring attention merges partial results with it (see its docstring).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from mlgen.ops.attention import _common
from mlgen.ops.attention._common import (
    MaskSpec,
    block_mask,
    kv_block_range,
    pad_axis,
    q_block_range,
    round_up,
)
from mlgen.ops.attention.block_sizes import BlockSizes, blockwise_default
from mlgen.typing import Array, Float

_F32 = jnp.float32


def attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    segment_ids=None,
    sliding_window: int | None = None,
    scale: float | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T N H"]:
    """Blockwise attention; same contract as ``reference.attention``."""
    del interpret  # plain JAX: nothing to interpret
    out, _ = attention_with_lse(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids,
        sliding_window=sliding_window,
        scale=scale,
        block_sizes=block_sizes,
    )
    return out


def attention_with_lse(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    causal: bool = False,
    segment_ids=None,
    sliding_window: int | None = None,
    scale: float | None = None,
    q_offset=None,
    block_sizes: BlockSizes | None = None,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Attention output and the log-sum-exp of each query row's (scaled, masked) logits.

    Args:
      q, k, v: as in ``mlgen.ops.attention``.
      segment_ids: None, ``[B, T]`` (needs T == S) or a ``(q_ids [B, T], kv_ids [B, S])`` pair.
      q_offset: position of query 0 among the S keys for the causal / window rules; default
        ``S - T``. May be a traced int32 scalar (ring attention passes
        ``(my_index - source_index) * block_len``).
      block_sizes: tunables; defaults from ``block_sizes.blockwise_default``.

    Returns:
      ``(out [B, T, N, H] in q.dtype, lse [B, T, N] float32)``. A row that sees no key has
      ``out = 0`` and ``lse = -inf``, so partial results over disjoint key sets merge as
      ``lse = logaddexp(lse_a, lse_b)``,
      ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``
      (guarding rows where both are ``-inf``). Both outputs are differentiable.
    """
    q_ids, kv_ids, q_offset, spec, scale, bs = _prepare(
        q, k, causal, segment_ids, sliding_window, scale, q_offset, block_sizes
    )
    return _attention(q, k, v, q_ids, kv_ids, q_offset, spec, scale, bs)


def attention_vjp_with_lse(
    q,
    k,
    v,
    out,
    lse,
    dout,
    *,
    causal: bool = False,
    segment_ids=None,
    sliding_window: int | None = None,
    scale: float | None = None,
    q_offset=None,
    block_sizes: BlockSizes | None = None,
):
    """``(dq, dk, dv)`` of these keys' share of an attention whose output and log-sum-exp are known.

    ``out [B, T, N, H]`` and ``lse [B, T, N]`` may come from attention of the same queries over
    a *larger* key set that contains ``k, v`` (ring attention: all blocks of the ring). The
    flash backward then needs only the global ``out`` and ``lse``: ``p = exp(s - lse)`` is
    this block's share of each row's softmax and ``rowsum(dout * out)`` the global row term,
    so ``dq`` is this block's contribution and ``dk, dv`` are exact for these keys. No
    forward is recomputed. Arguments as in ``attention_with_lse``; ``lse = -inf`` rows (no key
    anywhere) get zero gradients.
    """
    q_ids, kv_ids, q_offset, spec, scale, bs = _prepare(
        q, k, causal, segment_ids, sliding_window, scale, q_offset, block_sizes
    )
    K = k.shape[2]
    q5, k4, v4, qi_all, ki_all = _padded(q, k, v, q_ids, kv_ids, bs)
    Tp = q5.shape[3]
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0).astype(_F32)  # such rows are masked everywhere
    residuals = (
        q5,
        k4,
        v4,
        pad_axis(_to_groups(out.astype(q.dtype), K), 3, Tp),
        pad_axis(_to_groups(lse[..., None], K)[..., 0], 3, Tp),
        qi_all,
        ki_all,
    )
    dq, dk, dv, *_ = _bwd(
        spec, scale, bs, (residuals, q_offset), (dout, jnp.zeros(lse.shape, _F32))
    )
    return dq, dk, dv


def _prepare(q, k, causal, segment_ids, sliding_window, scale, q_offset, block_sizes):
    B, T, N, H = q.shape
    S = k.shape[1]
    scale = H**-0.5 if scale is None else float(scale)
    q_offset = jnp.asarray(S - T if q_offset is None else q_offset, jnp.int32)
    bs = (block_sizes or blockwise_default(T, S, H)).clamp(T, S)
    q_ids = kv_ids = None
    if segment_ids is not None:
        q_ids, kv_ids = (
            segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        )
        q_ids, kv_ids = q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)
    Sp = round_up(S, math.lcm(bs.block_k, bs.block_k_bwd))
    spec = MaskSpec(
        causal=causal,
        sliding_window=sliding_window,
        kv_len=S,
        has_segments=segment_ids is not None,
        kv_padded=Sp != S,
    )
    return q_ids, kv_ids, q_offset, spec, scale, bs


# --- layout helpers: BTNH <-> [B, K, G, T, H] so GQA never repeats K/V --------------------------


def _to_groups(q, K):
    B, T, N, H = q.shape
    return q.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)


def _from_groups(x):
    B, K, G, T = x.shape[:4]
    return x.transpose(0, 3, 1, 2, *range(4, x.ndim)).reshape(B, T, K * G, *x.shape[4:])


def _padded(q, k, v, q_ids, kv_ids, bs: BlockSizes):
    """q ``[B, K, G, Tp, H]``, k / v ``[B, K, Sp, H]`` and the ids,
    padded to both passes' blocks."""
    T, S, K = q.shape[1], k.shape[1], k.shape[2]
    Tp = round_up(T, math.lcm(bs.block_q, bs.block_q_bwd))
    Sp = round_up(S, math.lcm(bs.block_k, bs.block_k_bwd))
    return (
        pad_axis(_to_groups(q, K), 3, Tp),
        pad_axis(k.transpose(0, 2, 1, 3), 2, Sp),
        pad_axis(v.transpose(0, 2, 1, 3), 2, Sp),
        _ids(q_ids, Tp, -1),
        _ids(kv_ids, Sp, -2),
    )


def _ids(ids, length, fill):
    if ids is None:
        return None
    return pad_axis(ids, 1, length, fill)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, q_ids, kv_ids, q_offset, spec, scale, bs):
    out, lse, _ = _forward(q, k, v, q_ids, kv_ids, q_offset, spec, scale, bs)
    return out, lse


def _forward(q, k, v, q_ids, kv_ids, q_offset, spec: MaskSpec, scale: float, bs: BlockSizes):
    B, T, N, H = q.shape
    K = k.shape[2]
    bq, bk = bs.block_q, bs.block_k
    q5, k4, v4, qi_all, ki_all = _padded(q, k, v, q_ids, kv_ids, bs)
    Tp, Sp = q5.shape[3], k4.shape[2]
    nq, nk = Tp // bq, Sp // bk
    G = N // K

    def q_block(i):
        qi = lax.dynamic_slice_in_dim(q5, i * bq, bq, axis=3)
        qpos = (q_offset + i * bq + jnp.arange(bq))[:, None]
        qid = (
            None if qi_all is None else lax.dynamic_slice_in_dim(qi_all, i * bq, bq, 1)[:, :, None]
        )
        lo, hi = kv_block_range(spec, q_offset, i, bq, bk, nk)

        def body(j, carry):
            m, row_sum, acc = carry
            kj = lax.dynamic_slice_in_dim(k4, j * bk, bk, axis=2)
            vj = lax.dynamic_slice_in_dim(v4, j * bk, bk, axis=2)
            s = jnp.einsum("bkgqh,bksh->bkgqs", qi, kj, preferred_element_type=_F32) * scale
            kpos = (j * bk + jnp.arange(bk))[None, :]
            kid = (
                None
                if ki_all is None
                else lax.dynamic_slice_in_dim(ki_all, j * bk, bk, 1)[:, None, :]
            )
            mask = block_mask(spec, qpos, kpos, qid, kid)
            if mask is not None:
                mask = mask if mask.ndim == 3 else mask[None]
                s = jnp.where(mask[:, None, None], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            ms = _common.safe_max(m_new)
            p = jnp.exp(s - ms[..., None])
            alpha = jnp.exp(m - ms)
            row_sum = alpha * row_sum + p.sum(-1)
            acc = alpha[..., None] * acc + jnp.einsum(
                "bkgqs,bksh->bkgqh", p.astype(v.dtype), vj, preferred_element_type=_F32
            )
            return m_new, row_sum, acc

        init = (
            jnp.full((B, K, G, bq), -jnp.inf, _F32),
            jnp.zeros((B, K, G, bq), _F32),
            jnp.zeros((B, K, G, bq, H), _F32),
        )
        m, row_sum, acc = lax.fori_loop(lo, hi, body, init)
        o, lse = _common.online_softmax_finish(m[..., None], row_sum[..., None], acc)
        return o.astype(q.dtype), lse[..., 0]

    o_blocks, lse_blocks = lax.map(q_block, jnp.arange(nq))  # [nq, B, K, G, bq, (H)]
    o5 = jnp.moveaxis(o_blocks, 0, 3).reshape(B, K, G, Tp, H)
    lse5 = jnp.moveaxis(lse_blocks, 0, 3).reshape(B, K, G, Tp)
    out = _from_groups(o5[:, :, :, :T])
    lse = _from_groups(lse5[:, :, :, :T])
    return out, lse, (q5, k4, v4, o5, lse5, qi_all, ki_all)


def _fwd(q, k, v, q_ids, kv_ids, q_offset, spec, scale, bs):
    out, lse, res = _forward(q, k, v, q_ids, kv_ids, q_offset, spec, scale, bs)
    return (out, lse), (res, q_offset)


def _bwd(spec: MaskSpec, scale: float, bs: BlockSizes, residuals, cotangents):
    (q5, k4, v4, o5, lse5, qi_all, ki_all), q_offset = residuals
    dout, dlse = cotangents
    B, T, N, H = dout.shape
    S, K = spec.kv_len, k4.shape[1]
    q_dtype, k_dtype = q5.dtype, k4.dtype
    Tp, Sp = q5.shape[3], k4.shape[2]
    bq, bk = bs.block_q_bwd, bs.block_k_bwd
    nq, nk = Tp // bq, Sp // bk
    do5 = pad_axis(_to_groups(dout, K), 3, Tp)
    # d lse / d s = p, so a cotangent on lse enters as a shift of the usual row term.
    delta = jnp.sum(do5.astype(_F32) * o5.astype(_F32), axis=-1)
    delta = delta - pad_axis(_to_groups(dlse[..., None], K)[..., 0], 3, Tp)
    lse_safe = lse5  # rows with lse = -inf are fully masked: p is zeroed by the mask below

    def kv_block(dq, j):
        kj = lax.dynamic_slice_in_dim(k4, j * bk, bk, axis=2)
        vj = lax.dynamic_slice_in_dim(v4, j * bk, bk, axis=2)
        kpos = (j * bk + jnp.arange(bk))[None, :]
        kid = (
            None if ki_all is None else lax.dynamic_slice_in_dim(ki_all, j * bk, bk, 1)[:, None, :]
        )
        lo, hi = q_block_range(spec, q_offset, j, bq, bk, nq, T)

        def body(i, carry):
            dq, dk, dv = carry
            sl = functools.partial(
                lax.dynamic_slice_in_dim, start_index=i * bq, slice_size=bq, axis=3
            )
            qi, doi, lsei, di = sl(q5), sl(do5), sl(lse_safe), sl(delta)
            s = jnp.einsum("bkgqh,bksh->bkgqs", qi, kj, preferred_element_type=_F32) * scale
            qpos = (q_offset + i * bq + jnp.arange(bq))[:, None]
            qid = (
                None
                if qi_all is None
                else lax.dynamic_slice_in_dim(qi_all, i * bq, bq, 1)[:, :, None]
            )
            mask = block_mask(spec, qpos, kpos, qid, kid)
            p = jnp.exp(s - lsei[..., None])
            if mask is not None:
                mask = mask if mask.ndim == 3 else mask[None]
                p = jnp.where(mask[:, None, None], p, 0.0)
            dv = dv + jnp.einsum(
                "bkgqs,bkgqh->bksh", p.astype(doi.dtype), doi, preferred_element_type=_F32
            )
            dp = jnp.einsum("bkgqh,bksh->bkgqs", doi, vj, preferred_element_type=_F32)
            ds = p * (dp - di[..., None]) * scale
            dk = dk + jnp.einsum(
                "bkgqs,bkgqh->bksh", ds.astype(qi.dtype), qi, preferred_element_type=_F32
            )
            dqi = jnp.einsum(
                "bkgqs,bksh->bkgqh", ds.astype(kj.dtype), kj, preferred_element_type=_F32
            )
            dq = lax.dynamic_update_slice_in_dim(dq, sl(dq) + dqi, i * bq, axis=3)
            return dq, dk, dv

        zeros = jnp.zeros((B, K, bk, H), _F32)
        dq, dk, dv = lax.fori_loop(lo, hi, body, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = lax.scan(kv_block, jnp.zeros(q5.shape, _F32), jnp.arange(nk))
    dq = _from_groups(dq[:, :, :, :T]).astype(q_dtype)
    # [nk, B, K, bk, H] -> [B, S, K, H]
    dk = jnp.moveaxis(dk, 0, 1).transpose(0, 1, 3, 2, 4).reshape(B, Sp, K, H)[:, :S].astype(k_dtype)
    dv = jnp.moveaxis(dv, 0, 1).transpose(0, 1, 3, 2, 4).reshape(B, Sp, K, H)[:, :S].astype(k_dtype)
    return dq, dk, dv, None, None, None


_attention.defvjp(_fwd, _bwd)
