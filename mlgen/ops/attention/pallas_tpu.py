"""Our Pallas Mosaic flash attention for TPU: forward + explicit backward.

Features: causal (block skipping, no fetch of skipped blocks), T != S, segment ids, grouped
K/V heads, sliding window, any length (padded to the blocks and masked), any head dim
(padded to a multiple of 128 lanes, except 64 which Mosaic takes as a full-width block).
Kernels: ``pallas_tpu_kernels``. On CPU it runs with ``interpret=True`` (the Mosaic
interpreter, ``pltpu.InterpretParams``); block sizes must then only be multiples of 8, on
TPU multiples of 128.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mlgen.ops.attention import pallas_tpu_kernels as kernels
from mlgen.ops.attention._common import MaskSpec, pad_axis, round_up
from mlgen.ops.attention.block_sizes import BlockSizes, pallas_tpu_default
from mlgen.typing import Array, Float

MAX_HEAD_DIM = 512
_DTYPES = (jnp.float32, jnp.bfloat16)


def unsupported(p) -> str | None:
    """Why this backend cannot run an ``api.Problem`` (None if it can)."""
    if p.platform != "tpu" and p.platform_known and not p.interpret:
        return (
            f"pallas_tpu needs a TPU (platform is {p.platform}); pass interpret=True to run the "
            "kernel in the Mosaic interpreter"
        )
    return kernel_unsupported(p.H, p.dtype)


def kernel_unsupported(H: int, dtype) -> str | None:
    """Why the kernels cannot take head dim ``H`` and ``dtype`` (None if they can),
    on any platform."""
    if H > MAX_HEAD_DIM:
        return f"pallas_tpu supports head dim H <= {MAX_HEAD_DIM}, got H={H}"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _DTYPES]:
        return f"pallas_tpu supports float32/bfloat16, got {dtype}"
    return None


def _padded_head_dim(H: int) -> int:
    return H if H == 64 else round_up(H, 128)


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
    """Same contract as ``reference.attention``."""
    return attention_with_lse(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids,
        sliding_window=sliding_window,
        scale=scale,
        interpret=interpret,
        block_sizes=block_sizes,
    )[0]


def attention_with_lse(
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
):
    """``(out [B, T, N, H], lse [B, T, N] float32)``; see ``blockwise.attention_with_lse``."""
    cfg, ids, prep, (T, H) = _setup(
        q, k, causal, segment_ids, sliding_window, scale, interpret, block_sizes
    )
    o, lse = _flash(prep(q, cfg.tp), prep(k, cfg.sp), prep(v, cfg.sp), ids, cfg.kernel)
    return o.transpose(0, 2, 1, 3)[:, :T, :, :H], jnp.swapaxes(lse, 1, 2)[:, :T]


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
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
):
    """``(dq, dk, dv)`` of these keys' share of an attention with known (global) ``out``
    and ``lse``.

    The kernel backward driven by the given output and log-sum-exp, which may come from
    attention over a larger key set (ring attention); see ``blockwise.attention_vjp_with_lse``.
    """
    cfg, ids, prep, (T, H) = _setup(
        q, k, causal, segment_ids, sliding_window, scale, interpret, block_sizes
    )
    qp, kp, vp = prep(q, cfg.tp), prep(k, cfg.sp), prep(v, cfg.sp)
    op, dop = prep(out.astype(q.dtype), cfg.tp), prep(dout.astype(q.dtype), cfg.tp)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0).astype(
        jnp.float32
    )  # such rows are masked everywhere
    lsep = pad_axis(jnp.swapaxes(lse, 1, 2), 2, cfg.tp)
    delta = jnp.einsum("bnth,bnth->bnt", dop.astype(jnp.float32), op.astype(jnp.float32))
    dq, dk, dv = kernels.backward(qp, kp, vp, dop, lsep, delta, ids, cfg.kernel)

    def unprep(x, L):
        return x.transpose(0, 2, 1, 3)[:, :L, :, :H]

    return unprep(dq, T), unprep(dk, k.shape[1]), unprep(dv, k.shape[1])


@dataclasses.dataclass(frozen=True)
class _Setup:
    kernel: kernels.KernelConfig
    tp: int
    sp: int


def _setup(q, k, causal, segment_ids, sliding_window, scale, interpret, block_sizes):
    B, T, N, H = q.shape
    S = k.shape[1]
    if H > MAX_HEAD_DIM:
        raise ValueError(f"pallas_tpu supports head dim H <= {MAX_HEAD_DIM}, got H={H}")
    scale = H**-0.5 if scale is None else float(scale)
    multiple = 8 if interpret else 128
    bs = block_sizes or pallas_tpu_default(T, S, H)
    for f in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
        if getattr(bs, f) % multiple:
            raise ValueError(
                f"pallas_tpu BlockSizes.{f} must be a multiple of {multiple}, got {getattr(bs, f)}"
            )
    bs = bs.clamp(T, S, multiple)
    Tp = round_up(T, math.lcm(bs.block_q, bs.block_q_bwd))
    Sp = round_up(S, math.lcm(bs.block_k, bs.block_k_bwd))
    Hp = _padded_head_dim(H)
    spec = MaskSpec(
        causal=causal,
        sliding_window=sliding_window,
        kv_len=S,
        has_segments=segment_ids is not None,
        kv_padded=Sp != S,
    )
    cfg = kernels.KernelConfig(
        spec=spec,
        q_offset=S - T,
        q_len=T,
        scale=scale,
        block_q=bs.block_q,
        block_k=bs.block_k,
        block_q_bwd=bs.block_q_bwd,
        block_k_bwd=bs.block_k_bwd,
        interpret=bool(interpret),
    )
    ids = None
    if segment_ids is not None:
        q_ids, kv_ids = (
            segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        )
        q_ids = pad_axis(q_ids.astype(jnp.int32), 1, Tp, -1)
        kv_ids = pad_axis(kv_ids.astype(jnp.int32), 1, Sp, -2)
        ids = (q_ids[:, :, None], q_ids[:, None, :], kv_ids[:, :, None], kv_ids[:, None, :])

    def prep(x, L):  # [B, L, h, H] -> [B, h, Lp, Hp]
        return pad_axis(pad_axis(x, 3, Hp), 1, L).transpose(0, 2, 1, 3)

    return _Setup(cfg, Tp, Sp), ids, prep, (T, H)


def _forward(q, k, v, ids, cfg):
    o, lse = kernels.forward(
        q, k, v, None if ids is None else ids[0], None if ids is None else ids[3], cfg
    )
    return o, lse[..., 0]


_flash = jax.custom_vjp(_forward, nondiff_argnums=(4,))


def _flash_fwd(q, k, v, ids, cfg):
    o, lse = _forward(q, k, v, ids, cfg)
    return (o, lse), (q, k, v, o, lse, ids)


def _flash_bwd(cfg, res, cts):
    q, k, v, o, lse, ids = res
    do, dlse = cts
    # d lse / d s = p: a cotangent on lse shifts the usual rowsum(dO * O) term.
    delta = jnp.einsum("bnth,bnth->bnt", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    dq, dk, dv = kernels.backward(q, k, v, do.astype(q.dtype), lse, delta, ids, cfg)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
