"""Multi-head self-attention (GQA, optional RoPE, optional sliding window) over
``mlgen.ops.attention``, with its own KV cache."""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen import ops
from mlgen.nn.core import Linear, LoRA
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
    adapts the projections named in ``lora_targets`` (``q``, ``k``, ``v``, ``o``).
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
        causal: bool = True,
    ) -> Float[Array, "B T D"]:
        """x ``[B, T, D]``; positions ``[B, T]`` (RoPE; may be None without it)."""
        q, k, v = self._qkv(x, positions)
        out = ops.attention(
            q,
            k,
            v,
            causal=causal,
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
