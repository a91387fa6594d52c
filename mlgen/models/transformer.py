"""Decoder-only transformer language model.

Supports:
- the Llama flavour: RMSNorm, RoPE (configurable theta), SwiGLU, grouped-query attention,
  no biases, untied embeddings by default;
- the GPT-2 flavour: LayerNorm, learned positions, GELU MLP, biases, tied embeddings;
- layers stacked on a leading ``layers`` axis and run with a scan (compile time does not grow
  with depth), with a remat policy (``none``, ``full``, ``dots``, ``dots_no_batch``);
- packed rows (``segment_ids`` + per-document ``positions``) and a KV cache for decoding;
- every attention backend of ``mlgen.ops.attention`` (``attention_backend``);
- logical axis names on every parameter and activation constraints at block boundaries.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.config import check
from mlgen.nn.attention import KVCache, SelfAttention
from mlgen.nn.core import Embed, LayerNorm, Linear, RMSNorm, dropout, normal_init, param
from mlgen.nn.mlp import MLP
from mlgen.sharding import constrain
from mlgen.typing import Array, Float, Int

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
BACKENDS = ("auto", "reference", "xla", "blockwise", "pallas_gpu", "pallas_tpu", "ring")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    flavour: Literal["llama", "gpt2"] = "llama"
    vocab_size: int = 256
    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = num_heads (multi-head); fewer = grouped-query attention
    head_dim: int = 0  # 0 = d_model // num_heads
    mlp_dim: int = 0  # 0 = 4 * d_model (gpt2) or 8/3 * d_model rounded up to 64 (llama)
    max_len: int = 1024  # learned position table size (gpt2)
    rope_theta: float = 10000.0
    tie_embeddings: bool | None = None  # None = flavour default (gpt2 tied, llama untied)
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attention_backend: str = "auto"  # a backend name, or several tried in order: "pallas_tpu,xla"
    attention_interpret: bool = False  # run Pallas kernels in interpret mode (CPU tests)
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"

    # Derived -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def hidden(self) -> int:
        if self.mlp_dim:
            return self.mlp_dim
        if self.flavour == "gpt2":
            return 4 * self.d_model
        return -(-int(8 * self.d_model / 3) // 64) * 64

    @property
    def tied(self) -> bool:
        return self.flavour == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    def validate(self) -> None:
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "max_len"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.flavour in ("llama", "gpt2"), "flavour", f"must be 'llama' or 'gpt2', got {self.flavour!r}")
        if not self.head_dim:
            check(self.d_model % self.num_heads == 0, "num_heads",
                  f"{self.num_heads} does not divide d_model={self.d_model} (or set head_dim)")
        check(self.num_kv_heads >= 0, "num_kv_heads", f"must be >= 0, got {self.num_kv_heads}")
        check(self.num_heads % self.kv_heads == 0, "num_kv_heads",
              f"{self.kv_heads} does not divide num_heads={self.num_heads}")
        check(self.head_size % 2 == 0 or self.flavour == "gpt2", "head_dim",
              f"RoPE needs an even head dim, got {self.head_size}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        backends = self.attention_backend.split(",")
        for b in backends:
            check(b in BACKENDS, "attention_backend", f"unknown backend {b!r}; choose from {list(BACKENDS)}")
        check(self.remat in REMAT_POLICIES, "remat", f"must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")

    @property
    def backend(self):
        parts = tuple(self.attention_backend.split(","))
        return parts[0] if len(parts) == 1 else parts


def _dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        gpt2 = cfg.flavour == "gpt2"
        Norm = LayerNorm if gpt2 else RMSNorm
        self.attn_norm = Norm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdtype, rngs=rngs)
        self.attn = SelfAttention(cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size, use_bias=gpt2,
                                  rope_theta=None if gpt2 else cfg.rope_theta, backend=cfg.backend,
                                  interpret=cfg.attention_interpret,
                                  dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.mlp_norm = Norm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdtype, rngs=rngs)
        self.mlp = MLP(cfg.d_model, cfg.hidden, kind="gelu" if gpt2 else "swiglu", use_bias=gpt2,
                       dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.dropout = cfg.dropout

    def __call__(self, x, *, positions, segment_ids, cache=None, rng=None):
        r1, r2 = jax.random.split(rng) if rng is not None else (None, None)
        h, cache = self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids, cache=cache)
        x = x + dropout(h, self.dropout, r1)
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout, r2)
        return constrain(x, ("batch", "length", "act_embed")), cache


class Transformer(nnx.Module):
    """Decoder-only LM: tokens ``[B, T]`` -> logits ``[B, T, V]`` (float32)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.pos_embed = (param(rngs, normal_init(0.01), (cfg.max_len, cfg.d_model), ("pos", "embed"), pdtype)
                          if cfg.flavour == "gpt2" else None)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return Block(cfg, rngs=r)

        self.blocks = make_blocks(rngs)
        Norm = LayerNorm if cfg.flavour == "gpt2" else RMSNorm
        self.final_norm = Norm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdtype, rngs=rngs)
        self.head = (None if cfg.tied else
                     Linear(cfg.d_model, cfg.vocab_size, in_names=("embed",), out_names=("vocab",),
                            init=normal_init(0.02), dtype=dtype, param_dtype=pdtype, rngs=rngs))

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """A stacked (``[L, ...]``) empty KV cache."""
        c = self.cfg
        one = KVCache.zeros(batch, max_len, c.kv_heads, c.head_size, _dtype(c.dtype))
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (c.num_layers,) + a.shape), one)

    def __call__(self, tokens: Int[Array, "B T"], *, positions: Int[Array, "B T"] | None = None,
                 segment_ids: Int[Array, "B T"] | None = None, cache: KVCache | None = None,
                 rng: jax.Array | None = None, return_hidden: bool = False):
        """Returns logits ``[B, T, V]`` (or final hidden states ``[B, T, D]`` with
        ``return_hidden``), and the updated cache when one is given.

        ``rng`` enables dropout (training); ``positions`` default to ``0..T-1`` (after the
        cache's index when decoding).
        """
        cfg = self.cfg
        B, T = tokens.shape
        if positions is None:
            start = 0 if cache is None else cache.index[0]
            positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        layer_rngs = (jax.random.split(rng, cfg.num_layers) if rng is not None and cfg.dropout > 0 else None)

        policy = REMAT_POLICIES[cfg.remat]

        def body(block: Block, x, lcache, lrng):
            return block(x, positions=positions, segment_ids=segment_ids, cache=lcache, rng=lrng)

        if cfg.remat != "none":
            body = nnx.remat(body, policy=policy, prevent_cse=False)

        @nnx.scan(in_axes=(0, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(block, x, lcache, lrng):
            return body(block, x, lcache, lrng)

        x, cache = run(self.blocks, x, cache, layer_rngs)
        x = self.final_norm(x)
        if return_hidden:
            return (x, cache) if cache is not None else x
        logits = self.logits(x)
        return (logits, cache) if cache is not None else logits

    def logits(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        out = self.embed.attend(x) if self.head is None else self.head(x)
        return constrain(out.astype(jnp.float32), ("batch", "length", "act_vocab"))


# Named size presets.
PRESETS = {
    "lm-tiny": TransformerConfig(flavour="llama", vocab_size=256, num_layers=4, d_model=256, num_heads=4,
                                 num_kv_heads=2),
    "gpt2-bench": TransformerConfig(flavour="gpt2", vocab_size=512, num_layers=6, d_model=384, num_heads=6,
                                    max_len=256),
}
