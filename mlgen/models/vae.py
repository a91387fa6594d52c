"""Convolutional KL autoencoder (Stable Diffusion's ``AutoencoderKL``, scaled down) in Flax NNX,
NHWC: the first stage of latent diffusion.

Supports:
- any number of resolution levels (``channels``, one width per level); every level but the last
  halves the resolution (strided 3x3 convolution), so the latent is ``image_size /
  2 ** (len(channels) - 1)`` on a side (``channels=(32, 64)``: factor 2, ``(32, 64, 64)``: 4);
- ``blocks_per_level`` unconditioned residual blocks (GroupNorm-SiLU-conv twice) per level in
  the encoder, one more per level in the mirrored decoder (as ``AutoencoderKL``);
- a middle of residual / self-attention / residual blocks (``mid_attention``) at the latent
  resolution, in both halves, through ``mlgen.ops.attention``;
- a diagonal Gaussian posterior: the encoder predicts ``latent_channels`` means and
  log-variances (clamped to [-30, 20] as ``DiagonalGaussianDistribution``), then 1x1
  ``quant_conv`` / ``post_quant_conv`` around the latent;
- the run's policy (``mlgen.nn.policy``): parameter / compute dtypes (GroupNorm and the outputs
  in float32) and the remat of every residual and attention block;
- logical-axis sharding of every parameter (``kernel`` / ``channels_in`` / ``channels`` /
  ``norm`` / ``heads`` / ``head_dim``), the same rules as the UNet.

The family's kind is ``"autoencoder"``: ``model.encode(x [B, H, W, C]) -> (mean, logvar)``
(each ``[B, h, w, latent_channels]``), ``model.decode(z) -> [B, H, W, C]``, and
``model(x, rng=None) -> (reconstruction, mean, logvar)`` (``z`` sampled from the posterior with
``rng``, its mean without). Its config has ``image_size``, ``in_channels``, ``latent_channels``,
``downsample`` and ``latent_shape``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.config import check, prefixed
from mlgen.models.family import Family, register
from mlgen.nn.conv import AttentionBlock, Conv2d, Downsample, GroupNorm, Upsample
from mlgen.nn.core import dropout
from mlgen.nn.policy import Policy
from mlgen.ops.attention import AttentionConfig
from mlgen.sharding import constrain
from mlgen.typing import Array, Float

__all__ = [
    "FAMILY",
    "LOGVAR_RANGE",
    "PRESETS",
    "VAE",
    "ResnetBlock",
    "VAEConfig",
    "kl_divergence",
    "sample_posterior",
]

# The log-variance clamp of Stable Diffusion's DiagonalGaussianDistribution.
LOGVAR_RANGE = (-30.0, 20.0)
_IMAGE = ("batch", "height", "width", None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """Shape of a KL autoencoder. The downsampling factor is ``2 ** (len(channels) - 1)``."""

    image_size: int = 16
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64)
    blocks_per_level: int = 1
    latent_channels: int = 4
    mid_attention: bool = True
    head_dim: int = 32
    num_groups: int = 8
    dropout: float = 0.0
    conv_impl: str = "auto"  # auto | xla | im2col
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
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
        check(self.image_size > 0, "image_size", f"must be > 0, got {self.image_size}")
        check(
            self.image_size % self.downsample == 0,
            "image_size",
            f"{self.image_size} is not divisible by the downsampling factor {self.downsample} "
            f"(2 ** (len(channels) - 1), channels={self.channels})",
        )
        check(self.in_channels > 0, "in_channels", f"must be > 0, got {self.in_channels}")
        check(
            self.latent_channels > 0,
            "latent_channels",
            f"must be > 0, got {self.latent_channels}",
        )
        check(
            self.blocks_per_level >= 1,
            "blocks_per_level",
            f"must be >= 1, got {self.blocks_per_level}",
        )
        check(self.head_dim > 0, "head_dim", f"must be > 0, got {self.head_dim}")
        check(
            not self.mid_attention or self.channels[-1] % self.head_dim == 0,
            "head_dim",
            f"{self.head_dim} does not divide the last level's width {self.channels[-1]}",
        )
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(
            self.conv_impl in ("auto", "xla", "im2col"),
            "conv_impl",
            f"must be auto, xla or im2col, got {self.conv_impl!r}",
        )
        prefixed("attention", self.attention.validate)

    @property
    def downsample(self) -> int:
        """How many image pixels one latent position covers, per side."""
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(h, w, latent_channels)`` of one image's latent."""
        return (self.latent_size, self.latent_size, self.latent_channels)


PRESETS: dict[str, VAEConfig] = {
    # Digits at 16x16 -> 8x8x4 latents (factor 2), about 0.66 M parameters.
    "vae-digits": VAEConfig(channels=(32, 64), latent_channels=4, num_groups=8),
    # Digits at 16x16 -> 4x4x4 latents (factor 4), about 0.95 M parameters.
    "vae-digits-f4": VAEConfig(channels=(32, 64, 64), latent_channels=4, num_groups=8),
    # Tests.
    "vae-tiny": VAEConfig(
        image_size=8, channels=(8, 16), latent_channels=2, head_dim=8, num_groups=4
    ),
}


class ResnetBlock(nnx.Module):
    """``AutoencoderKL``'s residual block: GN-SiLU-conv, GN-SiLU-dropout-conv, 1x1 skip when the
    width changes (no time embedding)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_groups: int,
        dropout: float = 0.0,
        conv_impl: str = "auto",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(impl=conv_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(in_channels, num_groups, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = Conv2d(in_channels, out_channels, 3, **kw)
        self.norm2 = GroupNorm(out_channels, num_groups, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = Conv2d(out_channels, out_channels, 3, **kw)
        self.skip = (
            Conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        )
        self.dropout = dropout

    def __call__(
        self, x: Float[Array, "B H W C"], *, rng: jax.Array | None = None
    ) -> Float[Array, "B H W O"]:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(dropout(jax.nn.silu(self.norm2(h)), self.dropout, rng))
        skip = x if self.skip is None else self.skip(x)
        return constrain(skip + h, _IMAGE)


class _Stack(nnx.Module):
    """A sequence of residual / attention / resampling blocks under the remat policy."""

    def __init__(self, blocks: list, policy: Policy):
        self.blocks = nnx.List(blocks)
        self.policy = policy

    def __call__(self, h, rng: jax.Array | None):
        res = self.policy.remat_block(lambda m, h, r: m(h, rng=r))
        attn = self.policy.remat_block(lambda m, h: m(h))
        for i, m in enumerate(self.blocks):
            if isinstance(m, ResnetBlock):
                h = res(m, h, None if rng is None else jax.random.fold_in(rng, i))
            elif isinstance(m, AttentionBlock):
                h = attn(m, h)
            else:
                h = m(h)
        return h


class VAE(nnx.Module):
    """``policy``: parameter / compute dtypes and the remat of each block (default: float32,
    none)."""

    def __init__(self, cfg: VAEConfig, *, policy: Policy = Policy(), rngs: nnx.Rngs):
        cfg.validate()
        self.cfg, self.policy = cfg, policy
        dt, pdt = policy.dtype, policy.param_dtype
        conv = dict(conv_impl=cfg.conv_impl, dtype=dt, param_dtype=pdt, rngs=rngs)
        conv2d = dict(impl=cfg.conv_impl, dtype=dt, param_dtype=pdt, rngs=rngs)
        res = dict(num_groups=cfg.num_groups, dropout=cfg.dropout, **conv)
        attn = dict(
            head_dim=cfg.head_dim,
            num_groups=cfg.num_groups,
            attention=cfg.attention,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )
        last = len(cfg.channels) - 1
        top, z = cfg.channels[-1], cfg.latent_channels

        def mid():
            return (
                [ResnetBlock(top, top, **res)]
                + ([AttentionBlock(top, **attn)] if cfg.mid_attention else [])
                + [ResnetBlock(top, top, **res)]
            )

        # Encoder: conv_in, levels down, middle, GN-SiLU-conv to (mean, logvar).
        self.enc_in = Conv2d(cfg.in_channels, cfg.channels[0], 3, **conv2d)
        blocks, ch = [], cfg.channels[0]
        for lv, width in enumerate(cfg.channels):
            for _ in range(cfg.blocks_per_level):
                blocks.append(ResnetBlock(ch, width, **res))
                ch = width
            if lv != last:
                blocks.append(Downsample(ch, **conv))
        self.encoder = _Stack(blocks + mid(), policy)
        self.enc_norm = GroupNorm(top, cfg.num_groups, param_dtype=pdt, rngs=rngs)
        self.enc_out = Conv2d(top, 2 * z, 3, **conv2d)
        self.quant_conv = Conv2d(2 * z, 2 * z, 1, **conv2d)
        # Decoder: post_quant_conv, conv_in, middle, levels up, GN-SiLU-conv to pixels.
        self.post_quant_conv = Conv2d(z, z, 1, **conv2d)
        self.dec_in = Conv2d(z, top, 3, **conv2d)
        blocks, ch = mid(), top
        for lv in reversed(range(len(cfg.channels))):
            width = cfg.channels[lv]
            for _ in range(cfg.blocks_per_level + 1):
                blocks.append(ResnetBlock(ch, width, **res))
                ch = width
            if lv != 0:
                blocks.append(Upsample(ch, **conv))
        self.decoder = _Stack(blocks, policy)
        self.dec_norm = GroupNorm(ch, cfg.num_groups, param_dtype=pdt, rngs=rngs)
        self.dec_out = Conv2d(ch, cfg.in_channels, 3, **conv2d)

    def encode(
        self, x: Float[Array, "B H W C"], *, rng: jax.Array | None = None
    ) -> tuple[Float[Array, "B h w Z"], Float[Array, "B h w Z"]]:
        """The posterior's ``(mean, logvar)`` (float32) of images ``x`` in [-1, 1]; ``rng``:
        dropout keys (None = deterministic)."""
        h = constrain(self.enc_in(x.astype(self.policy.dtype)), _IMAGE)
        h = self.encoder(h, rng)
        h = self.enc_out(jax.nn.silu(self.enc_norm(h)))
        moments = self.quant_conv(h, out_dtype=jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(
        self, z: Float[Array, "B h w Z"], *, rng: jax.Array | None = None
    ) -> Float[Array, "B H W C"]:
        """Images (float32, unclipped) from latents ``z``; ``rng``: dropout keys."""
        h = self.post_quant_conv(z.astype(self.policy.dtype))
        h = constrain(self.dec_in(h), _IMAGE)
        h = self.decoder(h, rng)
        return self.dec_out(jax.nn.silu(self.dec_norm(h)), out_dtype=jnp.float32)

    def __call__(
        self, x: Float[Array, "B H W C"], *, rng: jax.Array | None = None
    ) -> tuple[Float[Array, "B H W C"], Float[Array, "B h w Z"], Float[Array, "B h w Z"]]:
        """``(reconstruction, mean, logvar)``; ``z`` is sampled from the posterior with ``rng``
        (which also drives dropout), its mean without."""
        keys = (None, None, None) if rng is None else tuple(jax.random.split(rng, 3))
        mean, logvar = self.encode(x, rng=keys[0])
        z = mean if rng is None else sample_posterior(keys[1], mean, logvar)
        return self.decode(z, rng=keys[2]), mean, logvar


def sample_posterior(
    key: jax.Array, mean: Float[Array, "*S"], logvar: Float[Array, "*S"]
) -> Float[Array, "*S"]:
    """``mean + exp(logvar / 2) * eps`` (the reparameterisation trick)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_divergence(mean: Float[Array, "*S"], logvar: Float[Array, "*S"]) -> Float[Array, "*S"]:
    """Elementwise ``KL(N(mean, exp(logvar)) || N(0, 1))``."""
    return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


FAMILY = register(
    Family(
        name="vae",
        config=VAEConfig,
        kind="autoencoder",
        build=lambda cfg, rngs, policy: VAE(cfg, policy=policy, rngs=rngs),
        logical_axes=frozenset(
            {
                "kernel",
                "channels_in",
                "channels",
                "norm",
                "heads",
                "head_dim",
                "batch",
                "height",
                "width",
            }
        ),
    )
)
