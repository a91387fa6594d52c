"""Plain softmax attention: the spec every backend is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlgen.typing import Array, Float


def make_mask(
    T: int,
    S: int,
    *,
    causal: bool,
    segment_ids,
    sliding_window: int | None,
    q_offset: int | None = None,
) -> jax.Array | None:
    """Boolean mask ``[B or 1, T, S]`` (True = attend), or None when nothing is masked.

    Queries are the last ``T`` of ``S`` positions (``q_offset = S - T``) unless told otherwise,
    which is how causal decoding with T != S works. ``segment_ids`` is ``[B, T]`` (self-attention,
    T == S) or a ``(q_ids [B, T], kv_ids [B, S])`` pair; id 0 is treated as any other id.
    """
    q_offset = S - T if q_offset is None else q_offset
    qpos = jnp.arange(T)[:, None] + q_offset
    kpos = jnp.arange(S)[None, :]
    mask = None
    if causal:
        mask = kpos <= qpos
    if sliding_window is not None:
        win = (qpos - kpos) < sliding_window
        if not causal:
            win = win & ((kpos - qpos) < sliding_window)
        mask = win if mask is None else mask & win
    if mask is not None:
        mask = mask[None]
    if segment_ids is not None:
        q_ids, kv_ids = (
            segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        )
        seg = q_ids[:, :, None] == kv_ids[:, None, :]
        mask = seg if mask is None else mask & seg
    return mask


def attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    causal: bool = False,
    segment_ids=None,
    sliding_window: int | None = None,
    scale: float | None = None,
    interpret: bool = False,
) -> Float[Array, "B T N H"]:
    """Softmax attention materialising the ``[T, S]`` logits; the spec for every backend.

    Shapes and mask rules as in ``mlgen.ops.attention``; ``interpret`` is accepted (and ignored)
    so that every backend has the same signature. Differentiated by autodiff.
    """
    del interpret
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = H**-0.5 if scale is None else scale
    qg = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg.astype(jnp.float32), k.astype(jnp.float32)) * scale
    mask = make_mask(T, S, causal=causal, segment_ids=segment_ids, sliding_window=sliding_window)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    # A query row with nothing to attend to (possible with segment ids) gives zeros, not NaN.
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(jnp.float32))
    return out.reshape(B, T, N, H).astype(q.dtype)
