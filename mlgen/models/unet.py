"""ADM-style diffusion UNet (Dhariwal & Nichol 2021) in Flax NNX, NHWC.

Supports:
- any number of resolution levels (``channels`` per level), ``blocks_per_level`` residual
  blocks per level on the way down and one more on the way up (skip connections from every
  block, as ADM and diffusers' ``UNet2DModel``);
- residual blocks with GroupNorm and scale-shift conditioning on the time embedding;
- self-attention at chosen levels (and in the middle) through ``mlgen.ops.attention``;
- strided-conv downsampling, nearest + conv upsampling, dropout (explicit keys);
- class conditioning (``num_classes``; label ``num_classes`` is the null class used by
  classifier-free guidance);
- text conditioning (``context_dim`` > 0, :mod:`mlgen.models.text`): an owned text encoder
  (``text``) and a cross-attention block after every self-attention block (attention levels
  and the middle); the prompt comes as ``text_tokens=`` / ``text_mask=`` keyword arguments;
- low-resolution image conditioning for super-resolution (``low_res_channels``,
  ``low_res_size``; :mod:`mlgen.nn.lowres`): the low-res image is upsampled and concatenated to
  the input, its noise-augmentation level embedded and added to the time embedding;
- zero-initialised output convolutions (every residual branch starts as the identity);
- the run's policy (``mlgen.nn.policy``): parameter / compute dtypes (GroupNorm, softmax and the
  output in float32) and the remat of every residual and attention block;
- logical-axis sharding of every parameter (``channels`` / ``heads`` / ``norm`` / ``kernel``).

Called as ``model(x [B, H, W, C], time [B], labels [B] | None, rng=None) -> [B, H, W, C_out]``
(super-resolution: also ``low_res=[B, h, w, C_low], low_res_aug=[B]``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.config import check, prefixed
from mlgen.models.family import Family, register
from mlgen.models.text import (
    TEXT_AXES,
    TEXT_BATCH_AXES,
    ImageCrossAttention,
    TextConditioner,
    TextConfig,
    check_text,
    text_trainable,
    with_text_axes,
)
from mlgen.nn import lowres
from mlgen.nn.conv import (
    AttentionBlock,
    Conv2d,
    Downsample,
    GroupNorm,
    ResBlock,
    TimeEmbedding,
    Upsample,
)
from mlgen.nn.policy import Policy
from mlgen.ops.attention import AttentionConfig
from mlgen.sharding import constrain
from mlgen.typing import Array, Float, Int

__all__ = ["FAMILY", "PRESETS", "UNet", "UNetConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Shape of a UNet. ``attention_levels`` index ``channels`` (0 = full resolution)."""

    image_size: int = 16
    in_channels: int = 1
    out_channels: int = 0  # 0 = in_channels
    channels: tuple[int, ...] = (64, 128)
    blocks_per_level: int = 2
    attention_levels: tuple[int, ...] = (1,)
    mid_attention: bool = True
    head_dim: int = 32
    num_groups: int = 32
    time_embed_dim: int = 0  # 0 = 4 * channels[0]
    dropout: float = 0.0
    num_classes: int = 0  # 0 = unconditional
    conv_impl: str = "auto"  # auto | xla | im2col
    low_res_channels: int = 0  # super-resolution: channels of the low-res input (0 = none)
    low_res_size: int = 0  # its side (divides image_size)
    low_res_upsample: str = "bilinear"  # bilinear | nearest (to image_size, then concatenated)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    context_dim: int = 0  # text conditioning: cross-attention width (0 = no text)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)  # used when context_dim
    # Dtypes and remat are the run's (``precision``, ``remat``: ``mlgen.nn.policy.Policy``).

    def validate(self) -> None:
        check(len(self.channels) >= 1, "channels", "needs at least one level")
        for c in self.channels:
            check(
                c > 0 and c % self.num_groups == 0,
                "channels",
                "every level's width must be a positive multiple of "
                f"num_groups={self.num_groups}, got {self.channels}",
            )
            check(
                c % self.head_dim == 0 or not self.attention_levels,
                "head_dim",
                f"{self.head_dim} does not divide level width {c}",
            )
        check(
            self.image_size % (2 ** (len(self.channels) - 1)) == 0,
            "image_size",
            f"{self.image_size} is not divisible by 2**{len(self.channels) - 1} "
            "(one halving per extra level)",
        )
        check(self.in_channels > 0, "in_channels", f"must be > 0, got {self.in_channels}")
        check(self.out_channels >= 0, "out_channels", f"must be >= 0, got {self.out_channels}")
        check(
            self.blocks_per_level >= 1,
            "blocks_per_level",
            f"must be >= 1, got {self.blocks_per_level}",
        )
        for lv in self.attention_levels:
            check(
                0 <= lv < len(self.channels),
                "attention_levels",
                f"level {lv} out of range for {len(self.channels)} levels",
            )
        check(self.head_dim > 0, "head_dim", f"must be > 0, got {self.head_dim}")
        check(
            self.time_embed_dim >= 0, "time_embed_dim", f"must be >= 0, got {self.time_embed_dim}"
        )
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.num_classes >= 0, "num_classes", f"must be >= 0, got {self.num_classes}")
        check(
            self.conv_impl in ("auto", "xla", "im2col"),
            "conv_impl",
            f"must be auto, xla or im2col, got {self.conv_impl!r}",
        )
        lowres.check_fields(self)
        prefixed("attention", self.attention.validate)
        check_text(self.text, self.context_dim)
        check(
            not self.context_dim or self.attention_levels or self.mid_attention,
            "context_dim",
            "text conditioning needs attention levels or mid_attention (cross-attention follows "
            "the self-attention blocks)",
        )

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels


PRESETS: dict[str, UNetConfig] = {
    # The digits config: 16x16x1, 10 classes, about 0.76 M parameters.
    "unet-digits": UNetConfig(
        channels=(32, 64),
        blocks_per_level=1,
        attention_levels=(1,),
        head_dim=32,
        num_groups=8,
        num_classes=10,
    ),
    # The peers' benchmark shape (diffusers UNet2DModel defaults at 16x16x1, channels (64, 128)).
    "unet-bench": UNetConfig(
        channels=(64, 128), blocks_per_level=2, attention_levels=(1,), head_dim=8
    ),
    # Tests.
    "unet-tiny": UNetConfig(
        channels=(8, 16),
        blocks_per_level=1,
        attention_levels=(1,),
        head_dim=8,
        num_groups=4,
        image_size=8,
    ),
}


class UNet(nnx.Module):
    """``policy``: parameter / compute dtypes and the remat of each block (default: float32,
    none)."""

    def __init__(self, cfg: UNetConfig, *, policy: Policy = Policy(), rngs: nnx.Rngs):
        cfg.validate()
        self.cfg, self.policy = cfg, policy
        dt, pdt = policy.dtype, policy.param_dtype
        c0 = cfg.channels[0]
        emb = cfg.time_embed_dim or 4 * c0
        conv = dict(conv_impl=cfg.conv_impl, dtype=dt, param_dtype=pdt, rngs=rngs)
        res = dict(num_groups=cfg.num_groups, dropout=cfg.dropout, **conv)
        attn = dict(
            head_dim=cfg.head_dim,
            num_groups=cfg.num_groups,
            attention=cfg.attention,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )
        self.time = TimeEmbedding(c0, emb, num_classes=cfg.num_classes, param_dtype=pdt, rngs=rngs)
        self.text = (
            TextConditioner(cfg.text, cfg.context_dim, pooled_dim=emb, policy=policy, rngs=rngs)
            if cfg.context_dim
            else None
        )

        def attention_block(ch):  # self-attention, then cross-attention to the text
            cross = dict(attn, num_groups=cfg.num_groups)
            return [AttentionBlock(ch, **attn)] + (
                [ImageCrossAttention(ch, cfg.context_dim, **cross)] if cfg.context_dim else []
            )

        conv2d = dict(impl=cfg.conv_impl, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.low_res = (
            lowres.LowResInput(
                cfg.low_res_channels,
                cfg.low_res_size,
                cfg.image_size,
                emb,
                freq_dim=c0,
                method=cfg.low_res_upsample,
                param_dtype=pdt,
                rngs=rngs,
            )
            if cfg.low_res_channels
            else None
        )
        self.conv_in = Conv2d(cfg.in_channels + cfg.low_res_channels, c0, 3, **conv2d)

        down, skip_ch, ch = [], [c0], c0
        last = len(cfg.channels) - 1
        for lv, width in enumerate(cfg.channels):
            for _ in range(cfg.blocks_per_level):
                down.append(ResBlock(ch, width, emb, **res))
                ch = width
                if lv in cfg.attention_levels:
                    down.extend(attention_block(ch))
                skip_ch.append(ch)
            if lv != last:
                down.append(Downsample(ch, **conv))
                skip_ch.append(ch)
        self.down = nnx.List(down)
        self.mid = nnx.List(
            [ResBlock(ch, ch, emb, **res)]
            + (attention_block(ch) if cfg.mid_attention else [])
            + [ResBlock(ch, ch, emb, **res)]
        )
        up = []
        for lv in reversed(range(len(cfg.channels))):
            width = cfg.channels[lv]
            for _ in range(cfg.blocks_per_level + 1):
                up.append(ResBlock(ch + skip_ch.pop(), width, emb, **res))
                ch = width
                if lv in cfg.attention_levels:
                    up.extend(attention_block(ch))
            if lv != 0:
                up.append(Upsample(ch, **conv))
        self.up = nnx.List(up)
        self.norm_out = GroupNorm(ch, cfg.num_groups, param_dtype=pdt, rngs=rngs)
        self.conv_out = Conv2d(ch, cfg.output_channels, 3, zero_init=True, **conv2d)

    def __call__(
        self,
        x: Float[Array, "B H W C"],
        time: Float[Array, " B"],
        labels: Int[Array, " B"] | None = None,
        *,
        rng: jax.Array | None = None,
        low_res: Float[Array, "B h w L"] | None = None,
        low_res_aug: Float[Array, " B"] | None = None,
        text_tokens: Int[Array, "B S"] | None = None,
        text_mask: Array | None = None,
    ) -> Float[Array, "B H W C"]:
        """Denoiser output for noisy images ``x`` at ``time`` (``[B]``, any scale;
        0..1000 typical); a super-resolution model also takes the (noise-augmented) low-res
        image ``low_res`` and its augmentation level ``low_res_aug`` in [0, 1], a
        text-conditioned model the prompt ``text_tokens`` / ``text_mask`` ``[B, S]`` (all
        padding = the learned null condition)."""
        dt = self.policy.dtype
        emb = self.time(time, labels)
        if self.low_res is not None:
            x, aug_emb = self.low_res(x, low_res, low_res_aug)
            emb = emb + aug_emb
        emb = emb.astype(dt)
        ctx = ctx_mask = None
        if self.text is not None:
            if text_tokens is None or text_mask is None:
                raise ValueError(
                    "UNet: this model is text-conditioned; pass text_tokens, text_mask"
                )
            ctx, ctx_mask, pooled = self.text(text_tokens, text_mask)
            if pooled is not None:
                emb = emb + pooled.astype(dt)
        h = constrain(self.conv_in(x.astype(dt)), ("batch", "height", "width", None))
        skips = [h]
        n_res = 0

        def block_rng():
            nonlocal n_res
            n_res += 1
            return None if rng is None else jax.random.fold_in(rng, n_res)

        res = self.policy.remat_block(lambda m, h, emb, r: m(h, emb, rng=r))
        attn = self.policy.remat_block(lambda m, h: m(h))
        cross = self.policy.remat_block(lambda m, h, c, cm: m(h, c, cm))

        def block(m, h):  # residual and attention blocks under the remat policy
            if isinstance(m, ResBlock):
                return res(m, h, emb, block_rng())
            if isinstance(m, ImageCrossAttention):
                return cross(m, h, ctx, ctx_mask)
            return attn(m, h) if isinstance(m, AttentionBlock) else m(h)

        for m in self.down:
            h = block(m, h)
            if not isinstance(m, (AttentionBlock, ImageCrossAttention)):
                skips.append(h)
            else:
                skips[-1] = h
        for m in self.mid:
            h = block(m, h)
        for m in self.up:
            if isinstance(m, ResBlock):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = block(m, h)
        # Accumulated in float32 (the loss's prediction) whatever the compute dtype.
        return self.conv_out(jax.nn.silu(self.norm_out(h)), out_dtype=jnp.float32)


# The UNet's own logical axes (a text-conditioned one adds TEXT_AXES).
_AXES = frozenset(
    {
        "kernel",
        "channels_in",
        "channels",
        "norm",
        "heads",
        "head_dim",
        "vocab",
        "batch",
        "height",
        "width",
    }
)

FAMILY = register(
    Family(
        name="unet",
        config=UNetConfig,
        kind="denoiser",
        build=lambda cfg, rngs, policy: UNet(cfg, policy=policy, rngs=rngs),
        batch_axes={"labels": ("batch",), **TEXT_BATCH_AXES},
        logical_axes=_AXES | TEXT_AXES,
        axes_of=with_text_axes(_AXES),
        trainable=text_trainable,
        renamed={"attention_backend": "attention.backend"},
    )
)
