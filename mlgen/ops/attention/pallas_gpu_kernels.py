"""Pallas (Triton) flash-attention kernels for GPU: forward, dK/dV and dQ.

Arrays stay in the model layout ``[B, T, N, H]``; a BlockSpec with ``None`` squeezes the
batch and head axes, so no transposes are needed. Each program owns one query block
(forward, dQ) or one key block of one K/V head (dK/dV) and loops over only the blocks the
mask can reach (causal / window skipping). GQA: the dK/dV program walks the G query heads
of its K/V head, so repeated K/V never exist. Shapes arrive padded by the wrapper: T and S
to multiples of the block sizes, H to a power of two.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mlgen.ops.attention._common import (
    MaskSpec,
    block_mask,
    dot_nn,
    dot_nt,
    kv_block_range,
    online_softmax_finish,
    q_block_range,
    safe_max,
)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static parameters shared by the three kernels."""

    spec: MaskSpec
    q_offset: int
    q_len: int  # true T (queries past it are padding)
    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    interpret: bool
    num_warps: int | None = None
    num_stages: int | None = None


def _params(cfg: KernelConfig):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as plt

    return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _split(refs, n_in, has_seg):
    ins, outs = refs[:n_in], refs[n_in:]
    if has_seg:
        return ins[:-2], ins[-2], ins[-1], outs
    return ins, None, None, outs


# --- forward ------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg: KernelConfig, nk: int):
    (q_ref, k_ref, v_ref), qid_ref, kid_ref, (o_ref, lse_ref) = _split(
        refs, 3 + 2 * cfg.spec.has_segments, cfg.spec.has_segments
    )
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(2)
    q = q_ref[...]
    qpos = (cfg.q_offset + i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
    qid = None if qid_ref is None else qid_ref[...][:, None]
    lo, hi = kv_block_range(cfg.spec, cfg.q_offset, i, bq, bk, nk)

    def body(j, carry):
        m, row_sum, acc = carry
        ks = pl.ds(j * bk, bk)
        s = dot_nt(q, k_ref[ks, :]) * cfg.scale
        kpos = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
        kid = None if kid_ref is None else kid_ref[ks][None, :]
        mask = block_mask(cfg.spec, qpos, kpos, qid, kid)
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        ms = safe_max(m_new)
        p = jnp.exp(s - ms[:, None])
        alpha = jnp.exp(m - ms)
        v = v_ref[ks, :]
        acc = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v)
        return m_new, alpha * row_sum + jnp.sum(p, axis=1), acc

    H = q.shape[-1]
    init = (
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, H), jnp.float32),
    )
    m, row_sum, acc = lax.fori_loop(lo, hi, body, init)
    o, lse = online_softmax_finish(m[:, None], row_sum[:, None], acc)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def forward(q, k, v, q_ids, kv_ids, cfg: KernelConfig):
    """q ``[B, Tp, N, Hp]``, k/v ``[B, Sp, K, Hp]`` -> (o like q, lse ``[B, N, Tp]`` f32)."""
    B, Tp, N, H = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G, bq = N // K, cfg.block_q
    nq, nk = Tp // bq, Sp // cfg.block_k
    in_specs = [
        pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
        pl.BlockSpec((None, Sp, None, H), lambda b, n, i: (b, 0, lax.div(n, G), 0)),
        pl.BlockSpec((None, Sp, None, H), lambda b, n, i: (b, 0, lax.div(n, G), 0)),
    ]
    args = [q, k, v]
    if cfg.spec.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
            pl.BlockSpec((None, Sp), lambda b, n, i: (b, 0)),
        ]
        args += [q_ids, kv_ids]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nk=nk),
        grid=(B, N, nq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0)),
            pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, N, Tp), jnp.float32),
        ],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="mlgen_flash_fwd",
    )(*args)


# --- backward: dK/dV (one program per key block and K/V head) ----------------------------------


def _dkdv_kernel(*refs, cfg: KernelConfig, G: int, nq: int):
    n_in = 6 + 2 * cfg.spec.has_segments
    (q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref), qid_ref, kid_ref, (dk_ref, dv_ref) = _split(
        refs, n_in, cfg.spec.has_segments
    )
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    kpos = (j * bk + jnp.arange(bk, dtype=jnp.int32))[:, None]
    kid = None if kid_ref is None else kid_ref[...][:, None]
    lo, hi = q_block_range(cfg.spec, cfg.q_offset, j, bq, bk, nq, cfg.q_len)

    def make_body(g):
        def body(i, carry):
            dk, dv = carry
            qs = pl.ds(i * bq, bq)
            q, do = q_ref[qs, g, :], do_ref[qs, g, :]
            lse, delta = lse_ref[g, qs], d_ref[g, qs]
            # Work on transposed tiles [bk, bq] so every product is A @ B or A @ B.T.
            s_t = dot_nt(k, q) * cfg.scale
            qpos = (cfg.q_offset + i * bq + jnp.arange(bq, dtype=jnp.int32))[None, :]
            qid = None if qid_ref is None else qid_ref[qs][None, :]
            p_t = jnp.exp(s_t - lse[None, :])
            mask = block_mask(cfg.spec, qpos, kpos, qid, kid)
            if mask is not None:
                p_t = jnp.where(mask, p_t, 0.0)
            dv = dv + dot_nn(p_t.astype(do.dtype), do)
            ds_t = p_t * (dot_nt(v, do) - delta[None, :]) * cfg.scale
            dk = dk + dot_nn(ds_t.astype(q.dtype), q)
            return dk, dv

        return body

    H = k.shape[-1]
    acc = (jnp.zeros((bk, H), jnp.float32), jnp.zeros((bk, H), jnp.float32))
    for g in range(G):
        acc = lax.fori_loop(lo, hi, make_body(g), acc)
    dk_ref[...] = acc[0].astype(dk_ref.dtype)
    dv_ref[...] = acc[1].astype(dv_ref.dtype)


# --- backward: dQ (one program per query block and head) ----------------------------------------


def _dq_kernel(*refs, cfg: KernelConfig, nk: int):
    n_in = 6 + 2 * cfg.spec.has_segments
    (q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref), qid_ref, kid_ref, (dq_ref,) = _split(
        refs, n_in, cfg.spec.has_segments
    )
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], d_ref[...]
    qpos = (cfg.q_offset + i * bq + jnp.arange(bq, dtype=jnp.int32))[:, None]
    qid = None if qid_ref is None else qid_ref[...][:, None]
    lo, hi = kv_block_range(cfg.spec, cfg.q_offset, i, bq, bk, nk)

    def body(j, dq):
        ks = pl.ds(j * bk, bk)
        k = k_ref[ks, :]
        s = dot_nt(q, k) * cfg.scale
        kpos = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
        kid = None if kid_ref is None else kid_ref[ks][None, :]
        p = jnp.exp(s - lse[:, None])
        mask = block_mask(cfg.spec, qpos, kpos, qid, kid)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        ds = p * (dot_nt(do, v_ref[ks, :]) - delta[:, None]) * cfg.scale
        return dq + dot_nn(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def backward(q, k, v, do, lse, delta, q_ids, kv_ids, cfg: KernelConfig):
    """Gradients (dq, dk, dv) from the saved lse ``[B, N, Tp]`` and delta = rowsum(dO*O) - dlse."""
    B, Tp, N, H = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = N // K
    has_seg = cfg.spec.has_segments
    bqb, bkb = cfg.block_q_bwd, cfg.block_k_bwd
    in_specs = [
        pl.BlockSpec((None, Tp, G, H), lambda b, h, j: (b, 0, h, 0)),
        pl.BlockSpec((None, bkb, None, H), lambda b, h, j: (b, j, h, 0)),
        pl.BlockSpec((None, bkb, None, H), lambda b, h, j: (b, j, h, 0)),
        pl.BlockSpec((None, Tp, G, H), lambda b, h, j: (b, 0, h, 0)),
        pl.BlockSpec((None, G, Tp), lambda b, h, j: (b, h, 0)),
        pl.BlockSpec((None, G, Tp), lambda b, h, j: (b, h, 0)),
    ]
    args = [q, k, v, do, lse, delta]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0)),
            pl.BlockSpec((None, bkb), lambda b, h, j: (b, j)),
        ]
        args += [q_ids, kv_ids]
    kv_spec = pl.BlockSpec((None, bkb, None, H), lambda b, h, j: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, G=G, nq=Tp // bqb),
        grid=(B, K, Sp // bkb),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="mlgen_flash_dkdv",
    )(*args)

    bq = cfg.block_q
    q_spec = pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))
    full_kv = pl.BlockSpec((None, Sp, None, H), lambda b, n, i: (b, 0, lax.div(n, G), 0))
    in_specs = [q_spec, full_kv, full_kv, q_spec, row_spec, row_spec]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
            pl.BlockSpec((None, Sp), lambda b, n, i: (b, 0)),
        ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, nk=Sp // cfg.block_k),
        grid=(B, N, Tp // bq),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="mlgen_flash_dq",
    )(*args)
    return dq, dk, dv
