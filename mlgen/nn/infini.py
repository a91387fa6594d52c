"""Infini-attention (Munkhdalai et al. 2024): local causal attention inside segments of
``segment_len`` tokens plus a compressive linear-attention memory carried across segments, mixed
by a learned per-head gate (``mlgen.ops.infini`` has the math).

:class:`InfiniAttention` takes the arguments of ``mlgen.nn.attention.SelfAttention`` (it is one,
with the same q/k/v/o parameters, RoPE, GQA, LoRA and attention config) plus ``segment_len`` and
``delta_rule``, and one more parameter, the gate logits ``beta`` (logical axis ``heads``). Its
decoding cache is O(segment_len) per row whatever the context length: the current segment's K/V
and the memory of all earlier ones.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.nn.attention import SelfAttention
from mlgen.nn.core import LoRA, param, zeros_init
from mlgen.nn.rope import Llama3Scaling
from mlgen.ops import infini
from mlgen.ops.attention import AttentionConfig
from mlgen.sharding import constrain
from mlgen.typing import Array, Float, Int

F32 = jnp.float32


class InfiniCache(NamedTuple):
    """One Infini-attention layer's decoding state; every leaf has the batch axis first, since
    rows (left-padded to different lengths) cross segment boundaries at different steps.

    k, v: ``[B, K, L, H]`` the current segment's keys / values, slot = position % L;
    ``kv_ids``: ``[B, L]`` (1 = a real token of the current segment is in that slot);
    ``mem``: ``[B, K, H, H]`` and ``z``: ``[B, K, H]`` the memory of the finished segments
    (float32); ``segment``: ``[B]`` the segment (position // L) in the buffer, -1 before any.
    """

    k: jax.Array
    v: jax.Array
    kv_ids: jax.Array
    mem: jax.Array
    z: jax.Array
    segment: jax.Array

    @staticmethod
    def zeros(
        batch: int, segment_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32
    ) -> InfiniCache:
        kv = jnp.zeros((batch, num_kv_heads, segment_len, head_dim), dtype)
        return InfiniCache(
            kv,
            kv,
            jnp.zeros((batch, segment_len), jnp.int32),
            jnp.zeros((batch, num_kv_heads, head_dim, head_dim), F32),
            jnp.zeros((batch, num_kv_heads, head_dim), F32),
            jnp.full((batch,), -1, jnp.int32),
        )


class InfiniAttention(SelfAttention):
    """``o(infini_attention(q(x), k(x), v(x)))``: SelfAttention's layer with a segment memory.

    Training / scoring is ``__call__``: segments are consecutive runs of ``segment_len`` tokens
    of the row (positions ``0..T-1``); ``segment_ids`` mask local attention and keep each
    document's memory to itself. Decoding is :meth:`init_cache` + :meth:`decode`, where a
    token's segment is ``position // segment_len``: decoding a row equals ``__call__`` on that
    row's real tokens.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        segment_len: int,
        delta_rule: bool = False,
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
        infini.check_segment_len(segment_len)
        super().__init__(
            d_model,
            num_heads,
            num_kv_heads,
            head_dim,
            use_bias=use_bias,
            qkv_bias=qkv_bias,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            sliding_window=sliding_window,
            attention=attention,
            lora=lora,
            lora_targets=lora_targets,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        # sigmoid(0) = 1/2: memory and local attention start equally weighted (as the paper).
        self.beta = param(rngs, zeros_init, (num_heads,), ("heads",), param_dtype)
        self.segment_len, self.delta_rule = segment_len, delta_rule

    def __call__(
        self,
        x: Float[Array, "B T D"],
        *,
        positions: Int[Array, "B T"] | None,
        segment_ids: Int[Array, "B T"] | None = None,
        causal: bool = True,
    ) -> Float[Array, "B T D"]:
        """x ``[B, T, D]``; positions ``[B, T]`` (RoPE; may be None without it)."""
        if not causal:
            raise ValueError("causal: InfiniAttention is causal only (its memory reads the past)")
        q, k, v = self._qkv(x, positions)
        out = infini.infini_attention(
            q,
            k,
            v,
            self.beta[...],
            segment_len=self.segment_len,
            segment_ids=segment_ids,
            delta_rule=self.delta_rule,
            sliding_window=self.sliding_window,
            config=self.attention,
        )
        return self.o(constrain(out, ("batch", "length", "act_heads", None)))

    def init_cache(self, batch: int, max_len: int) -> InfiniCache:
        """An empty cache for ``batch`` rows; its size is independent of ``max_len``."""
        del max_len
        return InfiniCache.zeros(
            batch, self.segment_len, self.num_kv_heads, self.head_dim, self.dtype
        )

    def decode(
        self, x: Float[Array, "B T D"], positions: Int[Array, "B T"], cache: InfiniCache
    ) -> tuple[Float[Array, "B T D"], InfiniCache]:
        """T new tokens per row, one after another (T = 1 per step, or a whole prompt).

        A negative position marks padding (left-padded prompts): never written, never attended
        to, its row's state left as it was. Each token costs O(segment_len) work.
        """
        q, k, v = self._qkv(x, jnp.maximum(positions, 0))
        beta = self.beta[...]

        def step(c, xs):
            return _decode_token(c, *xs, beta, self.delta_rule, self.sliding_window)

        swap = lambda t: jnp.swapaxes(t, 0, 1)  # noqa: E731  (scan over T)
        cache, out = jax.lax.scan(step, cache, tuple(map(swap, (q, k, v, positions))))
        out = swap(out)
        return self.o(constrain(out, ("batch", "length", "act_heads", None))), cache


def _decode_token(
    c: InfiniCache, q, k, v, pos, beta, delta_rule: bool, sliding_window: int | None
) -> tuple[InfiniCache, jax.Array]:
    """One token per row: q ``[B, N, H]``, k/v ``[B, K, H]``, pos ``[B]`` -> (cache, out)."""
    B, N, H = q.shape
    K, L = c.k.shape[1], c.k.shape[2]
    real = pos >= 0
    segment = jnp.where(real, pos // L, c.segment)
    # A row entering a new segment first folds its finished one into the memory.
    cross = real & (c.segment >= 0) & (segment != c.segment)

    def fold(mem_z):
        weight = (c.kv_ids * cross[:, None]).astype(F32)
        return infini.update(
            *mem_z,
            infini.feature(c.k).swapaxes(1, 2),
            c.v.swapaxes(1, 2),
            weight,
            delta_rule=delta_rule,
        )

    mem, z = jax.lax.cond(jnp.any(cross), fold, lambda mz: mz, (c.mem, c.z))
    kv_ids = jnp.where(cross[:, None], 0, c.kv_ids)
    slot = jnp.maximum(pos, 0) % L
    here = real[:, None] & (jnp.arange(L)[None, :] == slot[:, None])  # [B, L]
    ck = jnp.where(here[:, None, :, None], k.astype(c.k.dtype)[:, :, None], c.k)
    cv = jnp.where(here[:, None, :, None], v.astype(c.v.dtype)[:, :, None], c.v)
    kv_ids = jnp.where(here, 1, kv_ids)
    c = InfiniCache(ck, cv, kv_ids, mem, z, segment)

    visible = (kv_ids != 0) & (jnp.arange(L)[None, :] <= slot[:, None])
    if sliding_window is not None:
        visible = visible & (slot[:, None] - jnp.arange(L)[None, :] < sliding_window)
    qg = q.reshape(B, K, N // K, H)
    logits = jnp.einsum("bkgh,bksh->bkgs", qg, ck.astype(q.dtype), preferred_element_type=F32)
    # A finite mask value: a padding query sees no key and gets an unused finite row.
    logits = jnp.where(visible[:, None, None], logits * H**-0.5, jnp.finfo(F32).min)
    p = jax.nn.softmax(logits, axis=-1)
    a_dot = jnp.einsum("bkgs,bksh->bkgh", p, cv.astype(F32))
    a_mem = infini.retrieve(infini.feature(qg)[:, None], mem, z)[:, 0]
    g = jax.nn.sigmoid(beta.astype(F32))[:, None]
    out = g * a_mem.reshape(B, N, H) + (1.0 - g) * a_dot.reshape(B, N, H)
    return c, out.astype(q.dtype)
