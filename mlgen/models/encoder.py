"""Bidirectional encoder (BERT-style, masked LM) and encoder-decoder (T5-style, seq2seq).

Supports:
- two families from the same blocks: ``encoder`` (:class:`Encoder`, kind ``"encoder"``: tokens
  + padding / segment ids -> hidden states and MLM logits) and ``encoder_decoder``
  (:class:`EncoderDecoder`, kind ``"seq2seq"``: source tokens -> encoder states; target tokens ->
  causal self-attention + cross-attention to the encoder states -> logits);
- pre-norm blocks (``x + f(norm(x))``) in both flavours: ``llama`` (RMSNorm, RoPE in the
  self-attention, SwiGLU, no biases) and ``bert`` (LayerNorm, learned positions, GELU MLP,
  biases). Pre-norm rather than BERT's post-norm: it trains without a tuned warmup and is what
  the decoder-only LM here uses; the ``bert`` flavour is BERT's parts in that arrangement;
- T5-style sharing: one embedding table for the encoder and the decoder inputs, tied to the
  output layer by default (``tie_embeddings``); no relative position bias (RoPE instead);
- padding and packed rows in the encoder: ``segment_ids`` (0 = padding, 1, 2, ... documents)
  mask the bidirectional attention, so a token sees only its own document, and padding changes
  nothing; the encoder-decoder's cross-attention masks the source padding;
- a text-encoder entry point for conditioning other models: :meth:`Encoder.encode` /
  :meth:`EncoderDecoder.encode` -> ``(hidden [B, S, D], mask [B, S])``, padding zeroed;
- decoding for the encoder-decoder: :meth:`EncoderDecoder.init_cache` (a KV cache per decoder
  layer), :meth:`EncoderDecoder.cross_cache` (each layer's cross-attention keys / values,
  computed once from the encoder output), :meth:`EncoderDecoder.decode`
  (``mlgen.samplers.seq2seq``);
- every attention backend of ``mlgen.ops.attention`` (``attention``: one ``AttentionConfig``);
  layers stacked on a ``layers`` axis and scanned (or unrolled, ``scan_layers``), each block
  rematerialised by the run's policy; mixed precision from the same policy; logical axis
  names on every parameter (the decoder-only LM's vocabulary, so the same rules shard it).

The family specs (``ENCODER``, ``ENCODER_DECODER``) are at the end of the file.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.config import check, prefixed
from mlgen.models.family import Family, register
from mlgen.models.transformer import (
    TransformerConfig,
    _scan,
    _stack,
    _unstack,
    transformer_flops_per_token,
)
from mlgen.nn.attention import CrossAttention, CrossKV, KVCache, SelfAttention
from mlgen.nn.core import Embed, LayerNorm, Linear, RMSNorm, dropout, normal_init, param
from mlgen.nn.mlp import MLP
from mlgen.nn.policy import Policy
from mlgen.ops.attention import AttentionConfig
from mlgen.sharding import constrain
from mlgen.typing import Array, Float, Int

__all__ = [
    "ENCODER",
    "ENCODER_DECODER",
    "PRESETS",
    "Encoder",
    "EncoderConfig",
    "EncoderDecoder",
    "EncoderDecoderConfig",
    "seq2seq_flops_per_example",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """A bidirectional encoder (the ``encoder`` family), and the fields both families share.

    ``segment_ids`` (or a padding mask) come with the tokens; ``max_len`` is the learned
    position table's size (``bert``) and bounds the sequence length there.
    """

    flavour: Literal["llama", "bert"] = "llama"
    vocab_size: int = 256
    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = num_heads; fewer = grouped-query attention
    head_dim: int = 0  # 0 = d_model // num_heads
    mlp_dim: int = 0  # 0 = 4 * d_model (bert) or 8/3 * d_model rounded up to 64 (llama)
    max_len: int = 512  # learned position table size (bert)
    rope_theta: float = 10000.0  # llama: RoPE base; 0 = no positional encoding
    tie_embeddings: bool = True  # the output layer is the embedding table (BERT, T5)
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    scan_layers: bool = True  # lax.scan over the stacked layers (False: one call per layer)

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
        if self.flavour == "bert":
            return 4 * self.d_model
        return -(-int(8 * self.d_model / 3) // 64) * 64

    @property
    def max_length(self) -> int | None:
        """The longest sequence the model takes: the position table (bert), else None."""
        return self.max_len if self.flavour == "bert" else None

    def validate(self) -> None:
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "max_len"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(
            self.flavour in ("llama", "bert"),
            "flavour",
            f"must be 'llama' or 'bert', got {self.flavour!r}",
        )
        if not self.head_dim:
            check(
                self.d_model % self.num_heads == 0,
                "num_heads",
                f"{self.num_heads} does not divide d_model={self.d_model} (or set head_dim)",
            )
        check(self.head_dim >= 0, "head_dim", f"must be >= 0, got {self.head_dim}")
        check(self.mlp_dim >= 0, "mlp_dim", f"must be >= 0, got {self.mlp_dim}")
        check(self.num_kv_heads >= 0, "num_kv_heads", f"must be >= 0, got {self.num_kv_heads}")
        check(
            self.num_heads % self.kv_heads == 0,
            "num_kv_heads",
            f"{self.kv_heads} does not divide num_heads={self.num_heads}",
        )
        check(
            self.rope_theta >= 0, "rope_theta", f"must be >= 0 (0 = no RoPE), got {self.rope_theta}"
        )
        check(
            self.head_size % 2 == 0 or self.flavour == "bert" or not self.rope_theta,
            "head_dim",
            f"RoPE needs an even head dim, got {self.head_size}",
        )
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        prefixed("attention", self.attention.validate)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderDecoderConfig(EncoderConfig):
    """A T5-style encoder-decoder (the ``encoder_decoder`` family): ``num_layers`` encoder
    layers, ``num_decoder_layers`` decoder layers (0 = as many), the other fields shared."""

    num_decoder_layers: int = 0

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    def validate(self) -> None:
        super().validate()
        check(
            self.num_decoder_layers >= 0,
            "num_decoder_layers",
            f"must be >= 0 (0 = num_layers), got {self.num_decoder_layers}",
        )


_ACT = ("batch", "length", "act_embed")


def _norm(cfg: EncoderConfig, pdtype, rngs):
    Norm = LayerNorm if cfg.flavour == "bert" else RMSNorm
    return Norm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdtype, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))`` (bidirectional in the encoder, causal in the
    decoder), then, in the decoder, ``x + cross(norm(x), memory)``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: EncoderConfig, *, policy: Policy, rngs: nnx.Rngs, decoder: bool):
        dtype, pdtype = policy.dtype, policy.param_dtype
        bert = cfg.flavour == "bert"
        heads = (cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size)
        kw = dict(use_bias=bert, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.attn_norm = _norm(cfg, pdtype, rngs)
        self.attn = SelfAttention(
            *heads,
            rope_theta=None if bert or not cfg.rope_theta else cfg.rope_theta,
            attention=cfg.attention,
            causal=decoder,
            **kw,
        )
        self.cross_norm = _norm(cfg, pdtype, rngs) if decoder else None
        self.cross = CrossAttention(*heads, attention=cfg.attention, **kw) if decoder else None
        self.mlp_norm = _norm(cfg, pdtype, rngs)
        self.mlp = MLP(cfg.d_model, cfg.hidden, kind="gelu" if bert else "swiglu", **kw)
        self.dropout = cfg.dropout

    def __call__(self, x, *, positions, segment_ids, memory=None, memory_mask=None, rng=None):
        r1, r2, r3 = jax.random.split(rng, 3) if rng is not None else (None, None, None)
        h = self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids)
        x = x + dropout(h, self.dropout, r1)
        if self.cross is not None:
            h = self.cross(self.cross_norm(x), memory, context_mask=memory_mask)
            x = x + dropout(h, self.dropout, r2)
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout, r3)
        return constrain(x, _ACT)

    def decode(self, x, positions, cache: KVCache, kv: CrossKV):
        h, cache = self.attn.decode(self.attn_norm(x), positions, cache)
        x = x + h
        x = x + self.cross.attend(self.cross_norm(x), kv)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, _ACT), cache


class Stack(nnx.Module):
    """``num_layers`` :class:`Block` s stacked on a ``layers`` axis, then a final norm."""

    def __init__(
        self, cfg: EncoderConfig, num_layers: int, *, policy: Policy, rngs: nnx.Rngs, decoder: bool
    ):
        self.blocks = _stack(
            num_layers, lambda r: Block(cfg, policy=policy, rngs=r, decoder=decoder), rngs
        )
        self.final_norm = _norm(cfg, policy.param_dtype, rngs)
        self.num_layers, self.scan_layers, self.policy = num_layers, cfg.scan_layers, policy
        self.rate = cfg.dropout

    def __call__(self, x, *, positions, segment_ids, memory=None, memory_mask=None, rng=None):
        layer_rngs = (
            jax.random.split(rng, self.num_layers) if rng is not None and self.rate > 0 else None
        )

        def body(block, x, lrng):
            return block(
                x,
                positions=positions,
                segment_ids=segment_ids,
                memory=memory,
                memory_mask=memory_mask,
                rng=lrng,
            )

        if self.scan_layers:
            x = _scan(self.blocks, x, layer_rngs, self.policy.remat_block(body, prevent_cse=False))
        else:
            unrolled = self.policy.remat_block(body, prevent_cse=True)
            for i, block in enumerate(self.layers()):
                x = unrolled(block, x, None if layer_rngs is None else layer_rngs[i])
        return self.final_norm(x)

    def layers(self) -> list[Block]:
        if isinstance(self.blocks, nnx.List):
            return list(self.blocks)
        return _unstack(self.blocks, self.num_layers)


class _Embedding(nnx.Module):
    """Token embedding (+ learned positions for ``bert``) and the output layer (tied or not)."""

    def __init__(self, cfg: EncoderConfig, *, policy: Policy, rngs: nnx.Rngs):
        dtype, pdtype = policy.dtype, policy.param_dtype
        self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.pos_embed = (
            param(rngs, normal_init(0.01), (cfg.max_len, cfg.d_model), ("pos", "embed"), pdtype)
            if cfg.flavour == "bert"
            else None
        )
        self.head = (
            None
            if cfg.tie_embeddings
            else Linear(
                cfg.d_model,
                cfg.vocab_size,
                in_names=("embed",),
                out_names=("vocab",),
                init=normal_init(0.02),
                dtype=dtype,
                param_dtype=pdtype,
                rngs=rngs,
            )
        )

    def __call__(self, tokens, positions):
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
        return constrain(x, _ACT)

    def logits(self, x):
        # float32 whatever the compute dtype (as the decoder-only LM's logits).
        f32 = jnp.float32
        out = (
            self.embed.attend(x, out_dtype=f32)
            if self.head is None
            else self.head(x, out_dtype=f32)
        )
        return constrain(out, ("batch", "length", "act_vocab"))


def _segments(tokens, mask) -> jax.Array:
    """``mask`` as int32 segment ids (bool / 0-1 masks are one document), all ones if None."""
    if mask is None:
        return jnp.ones(tokens.shape, jnp.int32)
    return mask.astype(jnp.int32)


def _positions(tokens, positions):
    if positions is not None:
        return positions
    B, T = tokens.shape
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


class Encoder(nnx.Module):
    """Bidirectional encoder: tokens ``[B, T]`` -> MLM logits ``[B, T, V]`` (float32).

    ``policy``: parameter / compute dtypes and each block's remat (default float32, none).
    """

    def __init__(self, cfg: EncoderConfig, *, policy: Policy = Policy(), rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.embedding = _Embedding(cfg, policy=policy, rngs=rngs)
        self.encoder = Stack(cfg, cfg.num_layers, policy=policy, rngs=rngs, decoder=False)

    def encode(
        self,
        tokens: Int[Array, "B T"],
        mask: Array | None = None,
        *,
        positions: Int[Array, "B T"] | None = None,
        rng: jax.Array | None = None,
    ) -> tuple[Float[Array, "B T D"], Array]:
        """Hidden states of ``tokens`` for a model that conditions on text.

        Args:
          tokens: ``[B, T]`` token ids.
          mask: ``[B, T]``: True / 1 on real tokens, False / 0 on padding; or segment ids
            (0 = padding, 1, 2, ... = packed documents, each attending to itself only); None =
            no padding.
          positions: ``[B, T]`` (packed rows: counting from 0 in each document); default
            ``0..T-1``.
          rng: enables dropout (training).

        Returns:
          ``(hidden [B, T, D], mask [B, T] bool)``: the final-norm hidden states, zero on
          padding, and the real-token mask (what cross-attention takes as its context mask).
        """
        seg = _segments(tokens, mask)
        x = self.embedding(tokens, _positions(tokens, positions))
        x = self.encoder(x, positions=_positions(tokens, positions), segment_ids=seg, rng=rng)
        real = seg > 0
        return jnp.where(real[..., None], x, jnp.zeros((), x.dtype)), real

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        segment_ids: Int[Array, "B T"] | None = None,
        positions: Int[Array, "B T"] | None = None,
        rng: jax.Array | None = None,
        return_hidden: bool = False,
    ):
        """MLM logits ``[B, T, V]`` (or the hidden states ``[B, T, D]`` with ``return_hidden``);
        ``segment_ids`` as ``mask`` of :meth:`encode`."""
        hidden, _ = self.encode(tokens, segment_ids, positions=positions, rng=rng)
        return hidden if return_hidden else self.logits(hidden)

    def logits(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        return self.embedding.logits(x)

    @property
    def max_length(self) -> int | None:
        return self.cfg.max_length


class EncoderDecoder(nnx.Module):
    """T5-style encoder-decoder: source ``[B, S]`` + decoder inputs ``[B, T]`` -> logits
    ``[B, T, V]`` (float32). One embedding table serves both sides (and the output layer when
    tied)."""

    def __init__(self, cfg: EncoderDecoderConfig, *, policy: Policy = Policy(), rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.embedding = _Embedding(cfg, policy=policy, rngs=rngs)
        self.encoder = Stack(cfg, cfg.num_layers, policy=policy, rngs=rngs, decoder=False)
        self.decoder = Stack(cfg, cfg.decoder_layers, policy=policy, rngs=rngs, decoder=True)

    def encode(
        self,
        tokens: Int[Array, "B S"],
        mask: Array | None = None,
        *,
        rng: jax.Array | None = None,
    ) -> tuple[Float[Array, "B S D"], Array]:
        """The encoder's ``(hidden [B, S, D], mask [B, S] bool)`` (as :meth:`Encoder.encode`)."""
        seg = _segments(tokens, mask)
        pos = _positions(tokens, None)
        x = self.encoder(self.embedding(tokens, pos), positions=pos, segment_ids=seg, rng=rng)
        real = seg > 0
        return jnp.where(real[..., None], x, jnp.zeros((), x.dtype)), real

    def __call__(
        self,
        inputs: Int[Array, "B S"],
        decoder_inputs: Int[Array, "B T"],
        *,
        input_mask: Array | None = None,
        rng: jax.Array | None = None,
        return_hidden: bool = False,
    ):
        """Logits ``[B, T, V]`` of the next target token after each decoder input (teacher
        forcing), or the decoder's hidden states with ``return_hidden``.

        ``input_mask`` ``[B, S]``: nonzero on real source tokens (None = no padding). Decoder
        inputs are right-padded targets shifted by one (``[bos, y_1, ...]``): causal attention
        keeps a real position from seeing the padding after it.
        """
        r_enc, r_dec = jax.random.split(rng) if rng is not None else (None, None)
        memory, mask = self.encode(inputs, input_mask, rng=r_enc)
        pos = _positions(decoder_inputs, None)
        x = self.decoder(
            self.embedding(decoder_inputs, pos),
            positions=pos,
            segment_ids=None,
            memory=memory,
            memory_mask=mask,
            rng=r_dec,
        )
        return x if return_hidden else self.logits(x)

    def logits(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        return self.embedding.logits(x)

    # -- decoding (mlgen.samplers.seq2seq) -------------------------------------------------
    @property
    def max_length(self) -> int | None:
        """Positions the model can encode on either side (bert's table), or None (RoPE)."""
        return self.cfg.max_length

    def init_cache(self, batch: int, max_len: int) -> tuple[KVCache, ...]:
        """An empty self-attention KV cache per decoder layer, for up to ``max_len`` tokens."""
        return tuple(b.attn.init_cache(batch, max_len) for b in self.decoder.layers())

    def cross_cache(self, memory: Float[Array, "B S D"], mask: Array) -> tuple[CrossKV, ...]:
        """Each decoder layer's cross-attention keys / values over ``memory`` (from
        :meth:`encode`), computed once per source."""
        return tuple(b.cross.project(memory, mask) for b in self.decoder.layers())

    def decode(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        cache: tuple[KVCache, ...],
        cross: tuple[CrossKV, ...],
    ) -> tuple[Float[Array, "B V"], tuple[KVCache, ...]]:
        """Runs T new decoder tokens per row through every decoder layer, writing them to
        ``cache``; returns the next-token logits after the last of them ``[B, V]`` and the
        updated caches. ``cross``: :meth:`cross_cache` of the source."""
        x = self.embedding(tokens, jnp.maximum(positions, 0))
        new = []
        for block, layer_cache, kv in zip(self.decoder.layers(), cache, cross, strict=True):
            x, layer_cache = block.decode(x, positions, layer_cache, kv)
            new.append(layer_cache)
        return self.logits(self.decoder.final_norm(x[:, -1:]))[:, 0], tuple(new)

    def for_decoding(self) -> "EncoderDecoder":
        """On CPU a copy whose decoder layers are sliced out of the stack once (as
        ``Transformer.for_decoding``: XLA:CPU would copy the slices at every token); else self."""
        if jax.default_backend() != "cpu" or isinstance(self.decoder.blocks, nnx.List):
            return self
        graphdef, state = nnx.split(self)
        out = nnx.merge(graphdef, state)
        out.decoder.blocks = nnx.List(self.decoder.layers())
        return out


# Named size presets.
PRESETS = {
    "encoder-tiny": EncoderConfig(vocab_size=264, num_layers=4, d_model=256, num_heads=4),
    "t5-tiny": EncoderDecoderConfig(vocab_size=32, num_layers=2, d_model=64, num_heads=4),
}


def _as_transformer(cfg: EncoderConfig, num_layers: int) -> TransformerConfig:
    """The decoder-only config whose per-layer matmuls are this model's self-attention + MLP."""
    return TransformerConfig(
        flavour="gpt2" if cfg.flavour == "bert" else "llama",
        vocab_size=cfg.vocab_size,
        num_layers=num_layers,
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_size,
        mlp_dim=cfg.hidden,
        max_len=max(cfg.max_len, 1),
    )


def encoder_flops_per_token(cfg: EncoderConfig, seq_len: int) -> float:
    """Training FLOPs per token of the encoder (forward + backward): the decoder-only LM's count
    (``transformer_flops_per_token``) with bidirectional attention (the full ``T x T``)."""
    return transformer_flops_per_token(_as_transformer(cfg, cfg.num_layers), seq_len, causal=False)


def seq2seq_flops_per_example(cfg: EncoderDecoderConfig, source_len: int, target_len: int) -> float:
    """Training FLOPs of one (source, target) pair, forward + backward, by formula.

    The encoder as :func:`encoder_flops_per_token` over ``S`` source tokens without the output
    layer; the decoder as the decoder-only LM over ``T`` target tokens (causal); plus, per
    decoder layer, the cross-attention's q and o projections (``2 D N H`` weights per target
    token), k and v (``2 D K H`` per source token), both at 6 FLOPs per weight, and its two
    ``T x S`` matmuls (``12 T S N H``).
    """
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
    S, T, L = source_len, target_len, cfg.decoder_layers
    enc = S * (encoder_flops_per_token(cfg, S) - 6.0 * D * cfg.vocab_size)
    dec = T * transformer_flops_per_token(_as_transformer(cfg, L), T, causal=True)
    cross = L * (6.0 * (T * 2 * D * N * H + S * 2 * D * K * H) + 12.0 * T * S * N * H)
    return enc + dec + cross


def _check_mesh(cfg: EncoderConfig, shards) -> None:
    n = shards("heads")
    check(
        cfg.num_heads % n == 0,
        "num_heads",
        f"{cfg.num_heads} is not divisible by the {n} shards of the heads axis",
    )


_TOKENS = ("batch", "length")
_AXES = frozenset(
    {
        "layers",
        "embed",
        "heads",
        "kv_heads",
        "head_dim",
        "mlp",
        "vocab",
        "norm",
        "pos",
        "batch",
        "length",
        "act_embed",
        "act_heads",
        "act_kv_heads",
        "act_mlp",
        "act_vocab",
    }
)

ENCODER = register(
    Family(
        name="encoder",
        config=EncoderConfig,
        kind="encoder",
        build=lambda cfg, rngs, policy: Encoder(cfg, policy=policy, rngs=rngs),
        batch_axes={k: _TOKENS for k in ("inputs", "segment_ids", "positions")},
        logical_axes=_AXES,
        check=_check_mesh,
        flops_per_token=encoder_flops_per_token,
    )
)

ENCODER_DECODER = register(
    Family(
        name="encoder_decoder",
        config=EncoderDecoderConfig,
        kind="seq2seq",
        build=lambda cfg, rngs, policy: EncoderDecoder(cfg, policy=policy, rngs=rngs),
        batch_axes={k: _TOKENS for k in ("inputs", "input_mask", "decoder_inputs")},
        logical_axes=_AXES,
        check=_check_mesh,
    )
)
