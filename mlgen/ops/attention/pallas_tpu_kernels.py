"""Pallas Mosaic (TPU) flash-attention kernels: forward, dK/dV and dQ.

Layout is head-major ``[B, N, T, H]`` so every tile is ``(rows, H)`` with H on the lanes.
The reduction over key blocks (forward, dQ) or over query heads and blocks (dK/dV) is the
innermost, ``arbitrary`` grid axis; running statistics live in VMEM scratch and the output
block is written at the last step. Blocks the mask cannot reach are skipped with ``pl.when``
and their index maps are clamped to a reachable block, so the pipeline does not fetch them.
Row statistics (lse, delta) come as ``[.., T, 1]`` columns for the forward / dQ tiles and as
``[.., 1, T]`` rows for the transposed dK/dV tiles, so no in-kernel transposes are needed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mlgen.ops.attention._common import (
    MaskSpec,
    block_mask,
    dot_nn,
    dot_nt,
    kv_block_range,
    q_block_range,
)

_P, _A = pltpu.PARALLEL, pltpu.ARBITRARY


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static parameters shared by the three kernels."""

    spec: MaskSpec
    q_offset: int
    q_len: int
    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    interpret: bool


def _call_kwargs(cfg: KernelConfig, semantics, cost: pl.CostEstimate | None = None):
    if cfg.interpret:
        return dict(interpret=pltpu.InterpretParams())
    kw = dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))
    if cost is not None:
        kw["cost_estimate"] = cost
    return kw


def _cost(cfg: KernelConfig, q, k, matmuls: int, *arrays) -> pl.CostEstimate:
    """What a kernel does, for XLA's cost analysis and scheduler (a custom call is opaque to
    both; without this, ``mlgen plan`` would count no attention FLOPs): ``matmuls`` T x S x H
    products of 2 FLOPs per multiply-add over the (query, key) pairs the mask keeps, one exp
    per kept pair, and every operand read or written once."""
    B, N, _, H = q.shape
    T, S = cfg.q_len, cfg.spec.kv_len
    kept = float(T) * S
    if cfg.spec.causal or cfg.spec.sliding_window:
        # query i (at position q_offset + i) sees keys up to its position, and only the last
        # sliding_window of them
        rows = [cfg.q_offset + i + 1 for i in (0, T - 1)]
        if cfg.spec.causal:
            mean = (min(rows[0], S) + min(rows[1], S)) / 2
        else:
            mean = S
        if cfg.spec.sliding_window:
            mean = min(mean, cfg.spec.sliding_window)
        kept = float(T) * mean
    pairs = B * N * kept
    return pl.CostEstimate(
        flops=int(2 * matmuls * pairs * H),
        transcendentals=int(pairs),
        bytes_accessed=int(sum(x.size * x.dtype.itemsize for x in (q, k, *arrays))),
    )


def _clamp(x, lo, hi):
    """Clamp a block index into [lo, hi - 1] (or lo when the range is empty)."""
    return jnp.maximum(jnp.minimum(x, hi - 1), lo)


def _split(refs, n_in, has_seg):
    ins, rest = refs[:n_in], refs[n_in:]
    if has_seg:
        return ins[:-2], ins[-2], ins[-1], rest
    return ins, None, None, rest


def _iota(shape, dim, start):
    return start + lax.broadcasted_iota(jnp.int32, shape, dim)


# --- forward ------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg: KernelConfig, nk: int):
    has_seg = cfg.spec.has_segments
    (q_ref, k_ref, v_ref), qid_ref, kid_ref, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split(
        refs, 3 + 2 * has_seg, has_seg
    )
    bq, bk = cfg.block_q, cfg.block_k
    i, j = pl.program_id(2), pl.program_id(3)
    lo, hi = kv_block_range(cfg.spec, cfg.q_offset, i, bq, bk, nk)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        s = dot_nt(q_ref[...], k_ref[...]) * cfg.scale
        mask = block_mask(
            cfg.spec,
            _iota((bq, bk), 0, cfg.q_offset + i * bq),
            _iota((bq, bk), 1, j * bk),
            None if qid_ref is None else qid_ref[...],
            None if kid_ref is None else kid_ref[...],
        )
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        ms = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - ms)
        alpha = jnp.exp(m_prev - ms)
        m_sc[...] = m_new
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + dot_nn(p.astype(v.dtype), v)

    @pl.when(j == nk - 1)
    def _finish():
        row_sum = l_sc[...]
        empty = row_sum == 0.0
        l_safe = jnp.where(empty, 1.0, row_sum)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(l_safe))


def forward(q, k, v, q_ids_col, kv_ids_row, cfg: KernelConfig):
    """q ``[B, N, Tp, Hp]``, k/v ``[B, K, Sp, Hp]`` -> (o like q, lse ``[B, N, Tp, 1]`` f32)."""
    B, N, Tp, H = q.shape
    K, Sp = k.shape[1], k.shape[2]
    G, bq, bk = N // K, cfg.block_q, cfg.block_k
    nq, nk = Tp // bq, Sp // bk

    def kv_index(b, n, i, j):
        lo, hi = kv_block_range(cfg.spec, cfg.q_offset, i, bq, bk, nk)
        return b, lax.div(n, G), _clamp(j, lo, hi), 0

    def kid_index(b, n, i, j):
        lo, hi = kv_block_range(cfg.spec, cfg.q_offset, i, bq, bk, nk)
        return b, 0, _clamp(j, lo, hi)

    in_specs = [
        pl.BlockSpec((None, None, bq, H), lambda b, n, i, j: (b, n, i, 0)),
        pl.BlockSpec((None, None, bk, H), kv_index),
        pl.BlockSpec((None, None, bk, H), kv_index),
    ]
    args = [q, k, v]
    if cfg.spec.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, n, i, j: (b, i, 0)),
            pl.BlockSpec((None, 1, bk), kid_index),
        ]
        args += [q_ids_col, kv_ids_row]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nk=nk),
        grid=(B, N, nq, nk),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, H), lambda b, n, i, j: (b, n, i, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda b, n, i, j: (b, n, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, N, Tp, 1), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, H), jnp.float32),
        ],
        name="mlgen_tpu_flash_fwd",
        **_call_kwargs(cfg, (_P, _P, _P, _A), _cost(cfg, q, k, 2, v, q)),
    )(*args)


# --- backward: dK/dV --------------------------------------------------------------------------


def _dkdv_kernel(*refs, cfg: KernelConfig, G: int, nq: int):
    has_seg = cfg.spec.has_segments
    (
        (q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref),
        qid_ref,
        kid_ref,
        (dk_ref, dv_ref, dk_sc, dv_sc),
    ) = _split(refs, 6 + 2 * has_seg, has_seg)
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    lo, hi = q_block_range(cfg.spec, cfg.q_offset, j, bq, bk, nq, cfg.q_len)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when((i >= lo) & (i < hi))
    def _step():
        q, do = q_ref[...], do_ref[...]
        k, v = k_ref[...], v_ref[...]
        # Transposed tiles [bk, bq]: every product is A @ B or A @ B.T.
        s_t = dot_nt(k, q) * cfg.scale
        p_t = jnp.exp(s_t - lse_ref[...])
        mask = block_mask(
            cfg.spec,
            _iota((bk, bq), 1, cfg.q_offset + i * bq),
            _iota((bk, bq), 0, j * bk),
            None if qid_ref is None else qid_ref[...],
            None if kid_ref is None else kid_ref[...],
        )
        if mask is not None:
            p_t = jnp.where(mask, p_t, 0.0)
        dv_sc[...] += dot_nn(p_t.astype(do.dtype), do)
        ds_t = p_t * (dot_nt(v, do) - d_ref[...]) * cfg.scale
        dk_sc[...] += dot_nn(ds_t.astype(q.dtype), q)

    @pl.when((g == G - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# --- backward: dQ -------------------------------------------------------------------------------


def _dq_kernel(*refs, cfg: KernelConfig, nk: int):
    has_seg = cfg.spec.has_segments
    (q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref), qid_ref, kid_ref, (dq_ref, dq_sc) = _split(
        refs, 6 + 2 * has_seg, has_seg
    )
    bq, bk = cfg.block_q, cfg.block_k
    i, j = pl.program_id(2), pl.program_id(3)
    lo, hi = kv_block_range(cfg.spec, cfg.q_offset, i, bq, bk, nk)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        q, do, k = q_ref[...], do_ref[...], k_ref[...]
        s = dot_nt(q, k) * cfg.scale
        p = jnp.exp(s - lse_ref[...])
        mask = block_mask(
            cfg.spec,
            _iota((bq, bk), 0, cfg.q_offset + i * bq),
            _iota((bq, bk), 1, j * bk),
            None if qid_ref is None else qid_ref[...],
            None if kid_ref is None else kid_ref[...],
        )
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        ds = p * (dot_nt(do, v_ref[...]) - d_ref[...]) * cfg.scale
        dq_sc[...] += dot_nn(ds.astype(k.dtype), k)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def backward(q, k, v, do, lse, delta, ids, cfg: KernelConfig):
    """(dq, dk, dv). lse / delta are ``[B, N, Tp]`` f32; ids is None or
    ``(q_col [B, Tp, 1], q_row [B, 1, Tp], kv_col [B, Sp, 1], kv_row [B, 1, Sp])``."""
    B, N, Tp, H = q.shape
    K, Sp = k.shape[1], k.shape[2]
    G = N // K
    has_seg = cfg.spec.has_segments
    lse_col, lse_row = lse[..., None], lse[:, :, None, :]
    d_col, d_row = delta[..., None], delta[:, :, None, :]

    # dK/dV: grid (B, K, key block, query head in group, query block).
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    nq, nk = Tp // bq, Sp // bk

    def qi(j, i):
        lo, hi = q_block_range(cfg.spec, cfg.q_offset, j, bq, bk, nq, cfg.q_len)
        return _clamp(i, lo, hi)

    q_spec = pl.BlockSpec((None, None, bq, H), lambda b, h, j, g, i: (b, h * G + g, qi(j, i), 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, j, g, i: (b, h * G + g, 0, qi(j, i)))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, h, j, g, i: (b, h, j, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [q, k, v, do, lse_row, d_row]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, 1, bq), lambda b, h, j, g, i: (b, 0, qi(j, i))),
            pl.BlockSpec((None, bk, 1), lambda b, h, j, g, i: (b, j, 0)),
        ]
        args += [ids[1], ids[2]]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, G=G, nq=nq),
        grid=(B, K, nk, G, nq),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)],
        name="mlgen_tpu_flash_dkdv",
        **_call_kwargs(cfg, (_P, _P, _P, _A, _A), _cost(cfg, q, k, 4, v, do, k, v)),
    )(*args)

    # dQ: grid (B, N, query block, key block).
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = Tp // bq, Sp // bk

    def kj(i, j):
        lo, hi = kv_block_range(cfg.spec, cfg.q_offset, i, bq, bk, nk)
        return _clamp(j, lo, hi)

    q_spec = pl.BlockSpec((None, None, bq, H), lambda b, n, i, j: (b, n, i, 0))
    col_spec = pl.BlockSpec((None, None, bq, 1), lambda b, n, i, j: (b, n, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, n, i, j: (b, lax.div(n, G), kj(i, j), 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, col_spec, col_spec]
    args = [q, k, v, do, lse_col, d_col]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, n, i, j: (b, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda b, n, i, j: (b, 0, kj(i, j))),
        ]
        args += [ids[0], ids[3]]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, nk=nk),
        grid=(B, N, nq, nk),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, H), jnp.float32)],
        name="mlgen_tpu_flash_dq",
        **_call_kwargs(cfg, (_P, _P, _P, _A), _cost(cfg, q, k, 3, v, do, q)),
    )(*args)
    return dq, dk, dv
