"""Text conditioning for the image denoisers (UNet, DiT): a text encoder the denoiser owns, a
learned null condition, and the cross-attention layers that read it.

Supports:
- :class:`TextConfig` (a denoiser config's ``text`` section, used when its ``context_dim`` > 0):
  the text encoder's shape (``mlgen.models.encoder.EncoderConfig``), the tokenizer name saved
  with the run (``byte`` or a sentencepiece model path), the prompt length, initialising the
  encoder from a trained encoder run (``init``: its workdir, e.g. the MLM run of
  ``configs/encoder/tiny_mlm.py``) and freezing it (``freeze``);
- :class:`TextConditioner`: prompt tokens + padding mask -> the cross-attention context
  ``[B, S, context_dim]`` (the encoder's hidden states through a trainable projection, as
  PixArt-alpha's caption projection), its mask, and optionally a pooled vector added to the
  time embedding (``pooled``, as Imagen). An empty prompt (an all-padding mask) maps to a
  learned null embedding: the condition classifier-free guidance drops to;
- :class:`ImageCrossAttention`: the UNet's cross-attention block (GroupNorm'd image tokens as
  queries, the context as keys / values through ``mlgen.nn.attention.CrossAttention``, whose
  segment ids mask the padding), zero-initialised output (it starts as the identity).

The denoiser is called with ``text_tokens`` ``[B, S]`` int and ``text_mask`` ``[B, S]`` (1 =
real token, 0 = padding) as keyword arguments (``TEXT_KEYS``, batch keys of the diffusion task).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.config import check, prefixed
from mlgen.models.encoder import ENCODER, Encoder, EncoderConfig
from mlgen.nn.attention import CrossAttention
from mlgen.nn.conv import GroupNorm
from mlgen.nn.core import Linear, normal_init, param, zeros_init
from mlgen.nn.policy import Policy
from mlgen.ops.attention import AttentionConfig
from mlgen.typing import Array, Float, Int

__all__ = [
    "TEXT_AXES",
    "TEXT_BATCH_AXES",
    "TEXT_KEYS",
    "ImageCrossAttention",
    "TextConditioner",
    "TextConfig",
    "text_trainable",
    "with_text_axes",
]

TEXT_KEYS = ("text_tokens", "text_mask")
TEXT_BATCH_AXES = {k: ("batch", None) for k in TEXT_KEYS}
# What the owned text encoder (all but its MLM logits) and the cross-attention layers'
# parameters / activations use.
TEXT_AXES = frozenset((ENCODER.logical_axes - {"act_vocab"}) | {"embed", "heads", "kv_heads"})


def _small_encoder() -> EncoderConfig:
    return EncoderConfig(vocab_size=256, num_layers=2, d_model=64, num_heads=2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextConfig:
    """The text side of a text-conditioned denoiser.

    Attributes:
      encoder: the text encoder's shape (its ``vocab_size`` covers the tokenizer's ids).
      tokenizer: ``byte`` (UTF-8 bytes, pad id 0) or a sentencepiece ``.model`` path; saved
        with the run, so ``mlgen sample --prompt`` tokenizes as training did.
      max_len: prompt length in tokens (longer prompts are cut).
      init: the workdir of a trained ``encoder`` run whose latest parameters initialise the
        text encoder (its model config must equal ``encoder``); "" = random init.
      freeze: keep the text encoder's parameters fixed (no gradient, no optimizer state); the
        projection, the null embedding and the cross-attention layers still train.
      pooled: also add the masked mean of the context, projected, to the time embedding.
    """

    encoder: EncoderConfig = dataclasses.field(default_factory=_small_encoder)
    tokenizer: str = "byte"
    max_len: int = 32
    init: str = ""
    freeze: bool = False
    pooled: bool = True

    def validate(self) -> None:
        check(self.max_len >= 1, "max_len", f"must be >= 1, got {self.max_len}")
        check(self.tokenizer != "", "tokenizer", "must be 'byte' or a sentencepiece model path")
        check(
            not self.freeze or self.init != "",
            "freeze",
            "freezes a randomly initialised encoder; set text.init=ENCODER_WORKDIR too",
        )
        prefixed("encoder", self.encoder.validate)
        limit = self.encoder.max_length
        check(
            limit is None or self.max_len <= limit,
            "max_len",
            f"{self.max_len} exceeds the encoder's position table (encoder.max_len={limit})",
        )


def check_text(cfg, context_dim: int) -> None:
    """The denoiser-side checks of ``context_dim`` / ``text`` (ConfigErrors naming them)."""
    check(context_dim >= 0, "context_dim", f"must be >= 0 (0 = no text), got {context_dim}")
    if context_dim:
        prefixed("text", cfg.validate)


def with_text_axes(axes: frozenset[str]) -> Callable[[object], frozenset[str]]:
    """``Family.axes_of`` of a denoiser whose own axes are ``axes``: plus the text path's
    (:data:`TEXT_AXES`) when the config has ``context_dim > 0``."""
    return lambda model_cfg: axes | (TEXT_AXES if model_cfg.context_dim else frozenset())


def text_trainable(model_cfg) -> Callable[[str], bool] | None:
    """``Family.trainable`` of a denoiser: the text encoder frozen when ``text.freeze``."""
    if not (model_cfg.context_dim and model_cfg.text.freeze):
        return None
    return lambda path: not path.startswith("text/encoder/")


class TextConditioner(nnx.Module):
    """Prompt tokens -> ``(context [B, S, context_dim], mask [B, S] bool, pooled [B, E] | None)``.

    Rows whose mask is all zero (the empty prompt, the dropped condition of classifier-free
    guidance) get the learned null embedding at position 0 (mask 1 there), zeros elsewhere.
    """

    def __init__(
        self,
        cfg: TextConfig,
        context_dim: int,
        *,
        pooled_dim: int = 0,
        policy: Policy = Policy(),
        rngs: nnx.Rngs,
    ):
        dt, pdt = policy.dtype, policy.param_dtype
        d = cfg.encoder.d_model
        self.encoder = Encoder(cfg.encoder, policy=policy, rngs=rngs)
        kw = dict(use_bias=True, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.proj = Linear(d, context_dim, in_names=("embed",), out_names=("embed",), **kw)
        self.null = param(rngs, normal_init(0.02), (context_dim,), ("embed",), pdt)
        self.pool = (
            Linear(
                context_dim,
                pooled_dim,
                in_names=("embed",),
                out_names=("channels",),
                init=zeros_init,
                **kw,
            )
            if cfg.pooled and pooled_dim
            else None
        )

    def __call__(
        self,
        tokens: Int[Array, "B S"],
        mask: Array,
        *,
        rng: jax.Array | None = None,
    ) -> tuple[Float[Array, "B S E"], Array, Float[Array, "B P"] | None]:
        mask = mask != 0
        hidden, mask = self.encoder.encode(tokens.astype(jnp.int32), mask, rng=rng)
        ctx = self.proj(hidden)
        ctx = jnp.where(mask[..., None], ctx, jnp.zeros((), ctx.dtype))
        empty = ~jnp.any(mask, axis=1)  # [B]
        first = jnp.arange(mask.shape[1]) == 0  # [S]
        use_null = empty[:, None] & first[None, :]  # [B, S]
        ctx = jnp.where(use_null[..., None], self.null[...].astype(ctx.dtype), ctx)
        mask = mask | use_null
        pooled = None
        if self.pool is not None:
            m = mask[..., None].astype(ctx.dtype)
            mean = jnp.sum(ctx * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
            pooled = self.pool(mean)
        return ctx, mask, pooled


class ImageCrossAttention(nnx.Module):
    """``x + CrossAttention(GroupNorm(x) as H*W tokens, context)``; zero-initialised output."""

    def __init__(
        self,
        channels: int,
        context_dim: int,
        *,
        head_dim: int = 32,
        num_groups: int = 32,
        attention: AttentionConfig | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if channels % head_dim:
            raise ValueError(
                f"ImageCrossAttention: {channels} channels are not divisible by head_dim={head_dim}"
            )
        n = channels // head_dim
        self.norm = GroupNorm(channels, num_groups, param_dtype=param_dtype, rngs=rngs)
        self.attn = CrossAttention(
            channels,
            n,
            n,
            head_dim,
            context_dim=context_dim,
            use_bias=True,
            zero_init_out=True,
            attention=attention,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(
        self, x: Float[Array, "B H W C"], context: Float[Array, "B S E"], mask: Array
    ) -> Float[Array, "B H W C"]:
        B, H, W, C = x.shape
        h = self.norm(x).reshape(B, H * W, C)
        out = self.attn(h, context.astype(h.dtype), context_mask=mask)
        return x + out.reshape(B, H, W, C).astype(x.dtype)
