"""Infini-attention (Munkhdalai et al. 2024, "Leave No Context Behind") as pure array functions.

A row is cut into segments of ``segment_len`` tokens. Inside a segment a token attends causally
to the segment's earlier tokens (``A_dot``, through :func:`mlgen.ops.attention`, so every backend
works). Across segments a compressive memory ``M [K, H, H]`` and normaliser ``z [K, H]`` per kv
head, built from the *previous* segments only, answer a linear-attention read (sigma = ELU + 1):

    A_mem = sigma(q) M / (sigma(q) z)                      (0 while the memory is empty)
    linear:  M += sigma(k)^T v
    delta:   M += sigma(k)^T (v - sigma(k) M / (sigma(k) z))
             z += sum_t sigma(k_t)
    out = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_dot      (beta: one scalar per head)

With grouped K/V heads the memory belongs to a kv head and the queries of its group share it.

:func:`infini_attention` is the training form: the local attention of every segment at once
(segments folded into the batch) and one ``lax.scan`` over segments carrying ``(M, z)``.
:func:`infini_reference` is the spec: a plain Python loop over segments. :func:`retrieve` and
:func:`update` are the memory read and write that a decoder calls one segment at a time.

Segment ids (packed rows, ``0`` = padding): local attention honours them as
``mlgen.ops.attention`` does; padding never enters the memory; and the memory is per document:
a query reads only what earlier segments stored of its own document. That holds when each
document's tokens are contiguous in the row (padding aside), which is how packing lays them out:
the memory then carries the document of the last real token seen so far and is emptied when the
next segment's last real token belongs to another document. All memory arithmetic is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlgen.ops.attention import AttentionConfig, attention
from mlgen.ops.attention import reference as attention_reference
from mlgen.typing import Array, Float, Int

F32 = jnp.float32


def check_segment_len(segment_len) -> None:
    """Raises a one-line ``ValueError`` naming ``segment_len`` unless it is a positive int."""
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len <= 0:
        raise ValueError(f"segment_len: must be a positive int, got {segment_len!r}")


def feature(x: jax.Array) -> jax.Array:
    """sigma(x) = ELU(x) + 1 in float32: a positive feature map, so normalisers stay > 0."""
    return jax.nn.elu(x.astype(F32)) + 1.0


def _safe_div(num, den):
    """``num / den`` where ``den > 0``, else 0 (an empty memory reads as zero; the gradient of
    the unused branch stays finite)."""
    ok = den > 0
    return jnp.where(ok[..., None], num / jnp.where(ok, den, 1.0)[..., None], 0.0)


def retrieve(
    sq: Float[Array, "B L K G H"], mem: Float[Array, "B K H H"], z: Float[Array, "B K H"]
) -> Float[Array, "B L K G H"]:
    """``sigma(q) M / (sigma(q) z)`` for features ``sq`` of queries grouped by kv head."""
    num = jnp.einsum("blkgh,bkhv->blkgv", sq, mem)
    den = jnp.einsum("blkgh,bkh->blkg", sq, z)
    return _safe_div(num, den)


def update(
    mem: Float[Array, "B K H H"],
    z: Float[Array, "B K H"],
    sk: Float[Array, "B L K H"],
    v: Float[Array, "B L K H"],
    weight: Float[Array, "B L"],
    *,
    delta_rule: bool,
) -> tuple[Float[Array, "B K H H"], Float[Array, "B K H"]]:
    """Folds one segment (key features ``sk``, values ``v``) into ``(M, z)``.

    ``weight`` is 1 for tokens that enter the memory and 0 for those that do not (padding, other
    documents, empty slots): a 0 token changes nothing. The delta rule stores only what the
    memory does not already retrieve for each key.
    """
    sk = sk * weight[:, :, None, None]
    v = v.astype(F32)
    if delta_rule:
        v = v - _safe_div(
            jnp.einsum("blkh,bkhv->blkv", sk, mem), jnp.einsum("blkh,bkh->blk", sk, z)
        )
    return mem + jnp.einsum("blkh,blkv->bkhv", sk, v), z + sk.sum(axis=1)


def _gate(beta, a_mem, a_dot, dtype):
    g = jax.nn.sigmoid(beta.astype(F32))[:, None]  # [N, 1]
    return (g * a_mem + (1.0 - g) * a_dot.astype(F32)).astype(dtype)


def _check(q, k, v, beta, segment_len, segment_ids):
    check_segment_len(segment_len)
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"q, k, v: expected [B, T, N, H], [B, T, K, H] x2, got {q.shape}, {k.shape}, {v.shape}"
        )
    B, T, N, H = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != H or N % k.shape[2]:
        raise ValueError(f"k, v: shape {k.shape} does not fit q {q.shape} (self-attention, GQA)")
    if v.shape[3] != H:
        raise ValueError(f"v: head dim {v.shape[3]} must equal q's {H}")
    if beta.shape != (N,):
        raise ValueError(f"beta: expected shape ({N},) (one gate per query head), got {beta.shape}")
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids: expected shape {(B, T)}, got {segment_ids.shape}")


def _last_real(ids: Int[Array, "B L"], carried: Int[Array, " B"]) -> Int[Array, " B"]:
    """The document of the last real (non-zero) token of a segment, or ``carried`` if none."""
    L = ids.shape[1]
    idx = jnp.max(jnp.where(ids != 0, jnp.arange(L), -1), axis=1)
    return jnp.where(
        idx >= 0, jnp.take_along_axis(ids, jnp.maximum(idx, 0)[:, None], 1)[:, 0], carried
    )


def infini_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    beta: Float[Array, " N"],
    *,
    segment_len: int,
    segment_ids: Int[Array, "B T"] | None = None,
    delta_rule: bool = False,
    sliding_window: int | None = None,
    scale: float | None = None,
    config: AttentionConfig | None = None,
) -> Float[Array, "B T N H"]:
    """Infini-attention of a whole row at once (training / scoring).

    Args:
      q: queries ``[B, T, N, H]``; k, v: ``[B, T, K, H]`` with K dividing N (GQA).
      beta: the gate logits ``[N]``: ``sigmoid(beta)`` weighs memory against local attention.
      segment_len: tokens per segment; T need not be a multiple of it (the last segment is
        shorter).
      segment_ids: ``[B, T]`` document ids (0 = padding) or None (one document per row).
      delta_rule: the delta-rule memory update instead of the linear one.
      sliding_window, scale: for the local attention, as in ``mlgen.ops.attention``.
      config: the local attention's ``AttentionConfig`` (backend, block sizes, ...).

    Returns:
      ``[B, T, N, H]`` in q's dtype.
    """
    _check(q, k, v, beta, segment_len, segment_ids)
    B, T, N, H = q.shape
    K, L = k.shape[2], segment_len
    S = -(-T // L)
    pad = S * L - T
    ids = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    # Appended tokens are padding (id 0): after every real token, so causal attention never
    # shows them to one, and the memory skips them.
    qp, kp, vp = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
    idp = jnp.pad(ids, ((0, 0), (0, pad)))

    def fold(t):  # [B, S*L, ...] -> [B*S, L, ...]
        return t.reshape(B * S, L, *t.shape[2:])

    a_dot = attention(
        fold(qp),
        fold(kp),
        fold(vp),
        causal=True,
        segment_ids=None if segment_ids is None else fold(idp),
        sliding_window=sliding_window,
        scale=scale,
        config=config,
    ).reshape(B, S * L, N, H)

    def chunks(t):  # [B, S*L, ...] -> [S, B, L, ...]
        return jnp.swapaxes(t.reshape(B, S, L, *t.shape[2:]), 0, 1)

    sq = feature(qp).reshape(B, S * L, K, N // K, H)
    sk = feature(kp)

    def step(carry, xs):
        mem, z, doc = carry
        sq_s, sk_s, v_s, id_s = xs
        reads = (id_s != 0) & (id_s == doc[:, None])
        a_mem = retrieve(sq_s, mem, z) * reads[:, :, None, None, None]
        new_doc = _last_real(id_s, doc)
        same = (new_doc == doc)[:, None, None]
        mem, z = jnp.where(same[..., None], mem, 0.0), jnp.where(same, z, 0.0)
        weight = ((id_s != 0) & (id_s == new_doc[:, None])).astype(F32)
        mem, z = update(mem, z, sk_s, v_s, weight, delta_rule=delta_rule)
        return (mem, z, new_doc), a_mem

    init = (jnp.zeros((B, K, H, H), F32), jnp.zeros((B, K, H), F32), jnp.zeros((B,), jnp.int32))
    _, a_mem = jax.lax.scan(step, init, tuple(map(chunks, (sq, sk, vp, idp))))
    a_mem = jnp.swapaxes(a_mem, 0, 1).reshape(B, S * L, N, H)
    return _gate(beta, a_mem, a_dot, q.dtype)[:, :T]


def infini_reference(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    beta: Float[Array, " N"],
    *,
    segment_len: int,
    segment_ids: Int[Array, "B T"] | None = None,
    delta_rule: bool = False,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> Float[Array, "B T N H"]:
    """The spec: one segment at a time in a Python loop, memory formulas written out per head.

    Same arguments and result as :func:`infini_attention`; local attention is the plain
    softmax reference on each segment's slice.
    """
    _check(q, k, v, beta, segment_len, segment_ids)
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    ids = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    elu1 = lambda x: jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0))).astype(F32)  # noqa: E731
    mem = jnp.zeros((B, K, H, H), F32)
    z = jnp.zeros((B, K, H), F32)
    doc = jnp.zeros((B,), jnp.int32)
    outs = []
    for start in range(0, T, segment_len):
        sl = slice(start, min(start + segment_len, T))
        qs, ks, vs, ids_s = q[:, sl], k[:, sl], v[:, sl], ids[:, sl]
        a_dot = attention_reference.attention(
            qs,
            ks,
            vs,
            causal=True,
            segment_ids=None if segment_ids is None else ids_s,
            sliding_window=sliding_window,
            scale=scale,
        ).astype(F32)
        # Read: query head n uses kv head n // G.
        sq = elu1(qs)
        memq, zq = jnp.repeat(mem, G, axis=1), jnp.repeat(z, G, axis=1)  # [B, N, H, H], [B, N, H]
        num = jnp.einsum("btnh,bnhv->btnv", sq, memq)
        den = jnp.einsum("btnh,bnh->btn", sq, zq)
        reads = (ids_s != 0) & (ids_s == doc[:, None])
        a_mem = jnp.where((den > 0)[..., None], num / jnp.where(den > 0, den, 1.0)[..., None], 0)
        a_mem = jnp.where(reads[:, :, None, None], a_mem, 0.0)
        g = jax.nn.sigmoid(beta.astype(F32))[None, None, :, None]
        outs.append((g * a_mem + (1 - g) * a_dot).astype(q.dtype))
        # Write: the document of the segment's last real token keeps (or starts) the memory.
        real = ids_s != 0
        last = jnp.max(jnp.where(real, jnp.arange(ids_s.shape[1]), -1), axis=1)
        new_doc = jnp.where(last >= 0, ids_s[jnp.arange(B), jnp.maximum(last, 0)], doc)
        keep = (new_doc == doc).astype(F32)
        mem, z = mem * keep[:, None, None, None], z * keep[:, None, None]
        w = (real & (ids_s == new_doc[:, None])).astype(F32)
        sk = elu1(ks) * w[:, :, None, None]  # [B, L, K, H]
        target = vs.astype(F32)
        if delta_rule:
            num = jnp.einsum("blkh,bkhv->blkv", sk, mem)
            den = jnp.einsum("blkh,bkh->blk", sk, z)
            target = target - jnp.where(
                (den > 0)[..., None], num / jnp.where(den > 0, den, 1.0)[..., None], 0.0
            )
        mem = mem + jnp.einsum("blkh,blkv->bkhv", sk, target)
        z = z + sk.sum(axis=1)
        doc = new_doc
    return jnp.concatenate(outs, axis=1)
