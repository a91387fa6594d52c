"""Attention layers over ``mlgen.ops.attention``.

- :class:`SelfAttention`: multi-head self-attention (GQA, optional RoPE, optional sliding
  window), causal (decoders) or bidirectional (encoders), with its own KV cache;
- :class:`CrossAttention`: queries from one sequence, keys / values from a context (an encoder's
  output), the context's padding masked; its keys / values are computed once per context
  (:class:`CrossKV`) for decoding.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen import ops
from mlgen.nn.core import Linear, LoRA, zeros_init
from mlgen.nn.rope import Llama3Scaling, apply_rope
from mlgen.ops.attention import AttentionConfig
from mlgen.sharding import constrain
from mlgen.typing import Array, Float, Int


class KVCache(NamedTuple):
    """One attention layer's cache.

    k, v: ``[B, K, S_max, H]`` (heads before slots, so each decode step reads every head's
    keys as one contiguous ``[S_max, H]`` matrix with no transpose of the cache); ``kv_ids``:
    ``[B, S_max]`` (1 = a real token was written there, 0 = padding or not yet written);
    ``index``: the next slot to write (a scalar, shared by the batch: prompts are left-padded
    to a common length).
    """

    k: jax.Array
    v: jax.Array
    kv_ids: jax.Array
    index: jax.Array

    @staticmethod
    def zeros(
        batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32
    ) -> KVCache:
        z = jnp.zeros((batch, num_kv_heads, max_len, head_dim), dtype)
        return KVCache(z, z, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


class SelfAttention(nnx.Module):
    """``o(attention(q(x), k(x), v(x)))`` with grouped K/V heads and optional RoPE.

    Training / scoring is ``__call__`` (every token at once, any ``mlgen.ops.attention``
    backend per ``attention``); decoding is :meth:`init_cache` + :meth:`decode`. ``lora``
    adapts the projections named in ``lora_targets`` (``q``, ``k``, ``v``, ``o``). ``causal``
    is the default mask of ``__call__``: True for decoders, False for bidirectional encoders
    (``decode`` is always causal).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        use_bias: bool = False,
        qkv_bias: bool | None = None,
        rope_theta: float | None = 10000.0,
        rope_scaling: Llama3Scaling | None = None,
        sliding_window: int | None = None,
        attention: AttentionConfig | None = None,
        lora: LoRA | None = None,
        lora_targets: Collection[str] = (),
        causal: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(
                f"SelfAttention: num_heads={num_heads} is not a multiple of "
                f"num_kv_heads={num_kv_heads}"
            )
        qkv_bias = use_bias if qkv_bias is None else qkv_bias
        kw = dict(use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def adapter(name):
            return lora if name in lora_targets else None

        self.q = Linear(
            d_model,
            (num_heads, head_dim),
            in_names=("embed",),
            out_names=("heads", "head_dim"),
            lora=adapter("q"),
            **kw,
        )
        self.k = Linear(
            d_model,
            (num_kv_heads, head_dim),
            in_names=("embed",),
            out_names=("kv_heads", "head_dim"),
            lora=adapter("k"),
            **kw,
        )
        self.v = Linear(
            d_model,
            (num_kv_heads, head_dim),
            in_names=("embed",),
            out_names=("kv_heads", "head_dim"),
            lora=adapter("v"),
            **kw,
        )
        self.o = Linear(
            (num_heads, head_dim),
            d_model,
            in_names=("heads", "head_dim"),
            out_names=("embed",),
            lora=adapter("o"),
            **{**kw, "use_bias": use_bias},
        )
        self.rope_theta, self.rope_scaling = rope_theta, rope_scaling
        self.sliding_window = sliding_window
        self.attention = attention or AttentionConfig()
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.causal = causal

    def _qkv(self, x, positions):
        q = constrain(self.q(x), ("batch", "length", "act_heads", None))
        k = constrain(self.k(x), ("batch", "length", "act_kv_heads", None))
        v = constrain(self.v(x), ("batch", "length", "act_kv_heads", None))
        if self.rope_theta is not None:
            q = apply_rope(q, positions, theta=self.rope_theta, scaling=self.rope_scaling)
            k = apply_rope(k, positions, theta=self.rope_theta, scaling=self.rope_scaling)
        return q, k, v

    def __call__(
        self,
        x: Float[Array, "B T D"],
        *,
        positions: Int[Array, "B T"] | None,
        segment_ids: Int[Array, "B T"] | None = None,
        causal: bool | None = None,
    ) -> Float[Array, "B T D"]:
        """x ``[B, T, D]``; positions ``[B, T]`` (RoPE; may be None without it); ``causal``
        None = the layer's own (``causal=`` of the constructor)."""
        q, k, v = self._qkv(x, positions)
        out = ops.attention(
            q,
            k,
            v,
            causal=self.causal if causal is None else causal,
            segment_ids=segment_ids,
            sliding_window=self.sliding_window,
            config=self.attention,
        )
        return self.o(constrain(out, ("batch", "length", "act_heads", None)))

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for ``batch`` rows of up to ``max_len`` tokens."""
        return KVCache.zeros(batch, max_len, self.num_kv_heads, self.head_dim, self.dtype)

    def decode(
        self, x: Float[Array, "B T D"], positions: Int[Array, "B T"], cache: KVCache
    ) -> tuple[Float[Array, "B T D"], KVCache]:
        """Causal attention of T new tokens per row to themselves and every earlier real token.

        The new tokens are written at ``cache.index``; a negative position marks a padding
        token (left-padded prompts): it is written but never attended to.
        """
        q, k, v = self._qkv(x, jnp.maximum(positions, 0))
        cache = _write(cache, k, v, (positions >= 0).astype(jnp.int32))
        out = _cached_attention(q, cache, self.sliding_window)
        return self.o(constrain(out, ("batch", "length", "act_heads", None))), cache


class CrossKV(NamedTuple):
    """A cross-attention layer's keys / values over one context, computed once (decoding).

    k, v: ``[B, S, K, H]``; ``kv_ids``: ``[B, S]`` int32, 1 = a real context position, 0 =
    padding (never attended to), or None when the context has no padding.
    """

    k: jax.Array
    v: jax.Array
    kv_ids: jax.Array | None


class CrossAttention(nnx.Module):
    """``o(attention(q(x), k(c), v(c)))``: queries from ``x``, keys / values from a context ``c``.

    No positional encoding (a query sees the context as a set; the encoder put the positions in
    it), grouped K/V heads, bidirectional: every query sees every real context position. The
    context's padding is masked by segment ids (``(q_ids, kv_ids)`` pairs of
    ``mlgen.ops.attention``), so any backend that takes segment pairs runs it. ``context_dim``
    is the context's width (an encoder's ``d_model``; default ``d_model``). Parameters: ``q``,
    ``k``, ``v``, ``o``, as :class:`SelfAttention`'s; ``zero_init_out`` starts ``o`` at zero (a
    residual cross-attention branch that begins as the identity).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        context_dim: int | None = None,
        use_bias: bool = False,
        zero_init_out: bool = False,
        attention: AttentionConfig | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(
                f"CrossAttention: num_heads={num_heads} is not a multiple of "
                f"num_kv_heads={num_kv_heads}"
            )
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        context_dim = context_dim or d_model
        self.q = Linear(
            d_model,
            (num_heads, head_dim),
            in_names=("embed",),
            out_names=("heads", "head_dim"),
            **kw,
        )
        kv_out = dict(out_names=("kv_heads", "head_dim"))
        self.k = Linear(context_dim, (num_kv_heads, head_dim), in_names=("embed",), **kv_out, **kw)
        self.v = Linear(context_dim, (num_kv_heads, head_dim), in_names=("embed",), **kv_out, **kw)
        self.o = Linear(
            (num_heads, head_dim),
            d_model,
            in_names=("heads", "head_dim"),
            out_names=("embed",),
            init=zeros_init if zero_init_out else None,
            **kw,
        )
        self.attention = attention or AttentionConfig()

    def project(self, context: Float[Array, "B S C"], mask: Array | None = None) -> CrossKV:
        """The keys / values of ``context`` ``[B, S, C]``; ``mask`` ``[B, S]`` (True / nonzero =
        a real position) or None (no padding)."""
        k = constrain(self.k(context), ("batch", "length", "act_kv_heads", None))
        v = constrain(self.v(context), ("batch", "length", "act_kv_heads", None))
        ids = None if mask is None else (mask != 0).astype(jnp.int32)
        return CrossKV(k, v, ids)

    def attend(self, x: Float[Array, "B T D"], kv: CrossKV) -> Float[Array, "B T D"]:
        """Queries from ``x`` ``[B, T, D]`` over precomputed keys / values ``kv``."""
        q = constrain(self.q(x), ("batch", "length", "act_heads", None))
        segments = None
        if kv.kv_ids is not None:
            # Every query has id 1, so it sees exactly the real context positions (id 1); a row
            # whose context is all padding gets a zero output.
            q_ids = jnp.ones(q.shape[:2], jnp.int32)
            segments = (q_ids, kv.kv_ids)
        out = ops.attention(
            q,
            kv.k.astype(q.dtype),
            kv.v.astype(q.dtype),
            segment_ids=segments,
            config=self.attention,
        )
        return self.o(constrain(out, ("batch", "length", "act_heads", None)))

    def __call__(
        self,
        x: Float[Array, "B T D"],
        context: Float[Array, "B S C"],
        *,
        context_mask: Array | None = None,
    ) -> Float[Array, "B T D"]:
        """``x`` ``[B, T, D]`` attends to ``context`` ``[B, S, C]`` (``context_mask`` ``[B, S]``:
        nonzero = real, or None)."""
        return self.attend(x, self.project(context, context_mask))


def _write(cache: KVCache, k, v, ids) -> KVCache:
    T = k.shape[1]
    at = (0, 0, cache.index, 0)
    return KVCache(
        jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype).transpose(0, 2, 1, 3), at),
        jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype).transpose(0, 2, 1, 3), at),
        jax.lax.dynamic_update_slice(cache.kv_ids, ids, (0, cache.index)),
        cache.index + T,
    )


def _cached_attention(q, cache: KVCache, sliding_window: int | None = None):
    """New queries at slots ``index - T .. index - 1`` attend to real cache slots
    up to their own (and less than ``sliding_window`` slots back, when set: prompts are
    left-padded, so slot distances between real tokens are position distances)."""
    B, T, N, H = q.shape
    K, S = cache.k.shape[1], cache.k.shape[2]
    q_slot = cache.index - T + jnp.arange(T)
    visible = (jnp.arange(S)[None, :] <= q_slot[:, None])[None] & (
        cache.kv_ids[:, None, :] != 0
    )  # [B, T, S]
    if sliding_window is not None:
        visible = visible & (q_slot[:, None] - jnp.arange(S)[None, :] < sliding_window)[None]
    qg = q.reshape(B, T, K, N // K, H)
    logits = (
        jnp.einsum(
            "btkgh,bksh->bkgts", qg, cache.k.astype(q.dtype), preferred_element_type=jnp.float32
        )
        * H**-0.5
    )
    # A finite mask value, as jax.nn.dot_product_attention: a left-padding query sees no key and
    # must get a finite (unused) row, or its NaN K/V would poison real rows through 0 * NaN.
    logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "bkgts,bksh->btkgh",
        p.astype(q.dtype),
        cache.v.astype(q.dtype),
        preferred_element_type=jnp.float32,
    )
    return out.reshape(B, T, N, H).astype(q.dtype)
