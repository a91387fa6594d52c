"""Our Pallas flash attention for GPU (Triton lowering): forward + explicit backward.

Features: causal (with block skipping), T != S (queries are the last T positions),
segment ids, grouped K/V heads, sliding window, any length (padded to the block sizes and
masked), head dims up to 256 (padded to a power of two). Kernels: ``pallas_gpu_kernels``.
On CPU it runs with ``interpret=True``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mlgen.ops.attention import pallas_gpu_kernels as kernels
from mlgen.ops.attention._common import MaskSpec, next_pow2, pad_axis, round_up
from mlgen.ops.attention.block_sizes import BlockSizes, pallas_gpu_default
from mlgen.typing import Array, Float

MAX_HEAD_DIM = 256
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def unsupported(p) -> str | None:
    """Why this backend cannot run an ``api.Problem`` (None if it can)."""
    if p.platform != "gpu" and p.platform_known and not p.interpret:
        return (
            f"pallas_gpu needs a GPU (platform is {p.platform}); pass interpret=True to run the "
            "kernel in the Pallas interpreter"
        )
    if p.H > MAX_HEAD_DIM:
        return f"pallas_gpu supports head dim H <= {MAX_HEAD_DIM}, got H={p.H}"
    if p.dtype not in [jnp.dtype(d) for d in _DTYPES]:
        return f"pallas_gpu supports float32/bfloat16/float16, got {p.dtype}"
    return None


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
    B, T, N, H = q.shape
    S = k.shape[1]
    if H > MAX_HEAD_DIM:
        raise ValueError(f"pallas_gpu supports head dim H <= {MAX_HEAD_DIM}, got H={H}")
    scale = H**-0.5 if scale is None else float(scale)
    bs = block_sizes or pallas_gpu_default(T, S, H)
    for f in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
        b = getattr(bs, f)
        if b & (b - 1) or b < 16:
            raise ValueError(f"pallas_gpu BlockSizes.{f} must be a power of two >= 16, got {b}")
    # Small inputs: shrink blocks to the next power of two that covers the sequence.
    bs = BlockSizes(
        block_q=min(bs.block_q, max(16, next_pow2(T))),
        block_k=min(bs.block_k, max(16, next_pow2(S))),
        block_q_bwd=min(bs.block_q_bwd, max(16, next_pow2(T))),
        block_k_bwd=min(bs.block_k_bwd, max(16, next_pow2(S))),
    )
    Tp = round_up(T, math.lcm(bs.block_q, bs.block_q_bwd))
    Sp = round_up(S, math.lcm(bs.block_k, bs.block_k_bwd))
    Hp = max(16, next_pow2(H))
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
        num_warps=4 if Hp <= 64 else 8,
        num_stages=2,
    )
    q_ids = kv_ids = None
    if segment_ids is not None:
        q_ids, kv_ids = (
            segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        )
        q_ids = pad_axis(q_ids.astype(jnp.int32), 1, Tp, -1)
        kv_ids = pad_axis(kv_ids.astype(jnp.int32), 1, Sp, -2)
    qp = pad_axis(pad_axis(q, 3, Hp), 1, Tp)
    kp = pad_axis(pad_axis(k, 3, Hp), 1, Sp)
    vp = pad_axis(pad_axis(v, 3, Hp), 1, Sp)
    o, lse = _flash(qp, kp, vp, q_ids, kv_ids, cfg)
    return o[:, :T, :, :H], jnp.swapaxes(lse, 1, 2)[:, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_ids, kv_ids, cfg):
    return kernels.forward(q, k, v, q_ids, kv_ids, cfg)


def _flash_fwd(q, k, v, q_ids, kv_ids, cfg):
    o, lse = kernels.forward(q, k, v, q_ids, kv_ids, cfg)
    return (o, lse), (q, k, v, o, lse, q_ids, kv_ids)


def _flash_bwd(cfg, res, cts):
    q, k, v, o, lse, q_ids, kv_ids = res
    do, dlse = cts
    # d lse / d s = p: a cotangent on lse shifts the usual rowsum(dO * O) term.
    delta = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    dq, dk, dv = kernels.backward(q, k, v, do.astype(q.dtype), lse, delta, q_ids, kv_ids, cfg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
