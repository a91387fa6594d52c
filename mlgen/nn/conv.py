"""Convolutional layers for image denoisers (NHWC): conv, GroupNorm, time embedding, res blocks.

Every parameter carries logical axis names: conv kernels ``("kernel", "kernel", "channels_in",
"channels")``, biases ``("channels",)``, norm scales / biases ``("norm",)``.

``Conv2d(impl=...)`` picks how a convolution is computed:

- ``"xla"``: ``lax.conv_general_dilated``;
- ``"im2col"``: the k*k shifted views concatenated on channels, then one matmul (what cuDNN
  calls implicit GEMM, done explicitly);
- ``"auto"``: ``"xla"`` (measured fastest on CPU, GPU and TPU; see ``mlgen bench diffusion
  --conv-impl``).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen import ops
from mlgen.nn.core import Linear, dropout, fan_in_init, ones_init, param, zeros_init
from mlgen.ops.attention import AttentionConfig
from mlgen.sharding import constrain
from mlgen.typing import Array, Float

ConvImpl = Literal["auto", "xla", "im2col"]
_IMAGE = ("batch", "height", "width", None)


def conv2d(
    x: Float[Array, "B H W C"],
    w: Float[Array, "k k C O"],
    *,
    stride: int = 1,
    impl: ConvImpl = "auto",
    out_dtype=None,
) -> Float[Array, "B h w O"]:
    """'SAME'-padded 2-D convolution (odd kernel), NHWC x HWIO; ``out_dtype``: accumulate and
    return in that dtype (default: the inputs')."""
    k = w.shape[0]
    if impl in ("auto", "xla") or k == 1:
        if k == 1 and stride == 1:
            return jnp.einsum("bhwc,co->bhwo", x, w[0, 0], preferred_element_type=out_dtype)
        pad = (k - 1) // 2
        return jax.lax.conv_general_dilated(
            x,
            w,
            (stride, stride),
            ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=out_dtype,
        )
    if impl != "im2col":
        raise ValueError(f"conv2d: impl must be 'auto', 'xla' or 'im2col', got {impl!r}")
    B, H, W, C = x.shape
    pad = (k - 1) // 2
    Ho, Wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    cols = jnp.concatenate(
        [
            xp[:, i : i + stride * (Ho - 1) + 1 : stride, j : j + stride * (Wo - 1) + 1 : stride, :]
            for i in range(k)
            for j in range(k)
        ],
        axis=-1,
    )
    return jnp.einsum(
        "bhwk,ko->bhwo", cols, w.reshape(k * k * C, -1), preferred_element_type=out_dtype
    )


class Conv2d(nnx.Module):
    """``k x k`` convolution with 'SAME' padding, optional stride and bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        use_bias: bool = True,
        zero_init: bool = False,
        impl: ConvImpl = "auto",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if kernel_size % 2 != 1:
            raise ValueError(f"Conv2d: kernel_size must be odd, got {kernel_size}")
        init = zeros_init if zero_init else fan_in_init(kernel_size * kernel_size * in_channels)
        self.kernel = param(
            rngs,
            init,
            (kernel_size, kernel_size, in_channels, out_channels),
            ("kernel", "kernel", "channels_in", "channels"),
            param_dtype,
        )
        self.bias = (
            param(rngs, zeros_init, (out_channels,), ("channels",), param_dtype)
            if use_bias
            else None
        )
        self.stride = stride
        self.impl = impl
        self.dtype = dtype

    def __call__(self, x: Float[Array, "B H W C"], *, out_dtype=None) -> Float[Array, "B h w O"]:
        """``out_dtype``: accumulate and return in that dtype (default: the compute dtype)."""
        y = conv2d(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            stride=self.stride,
            impl=self.impl,
            out_dtype=out_dtype,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class GroupNorm(nnx.Module):
    """GroupNorm over NHWC (statistics in float32)."""

    def __init__(
        self,
        channels: int,
        num_groups: int = 32,
        *,
        eps: float = 1e-5,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        if channels % num_groups:
            raise ValueError(
                f"GroupNorm: {channels} channels are not divisible into {num_groups} groups"
            )
        self.num_groups = num_groups
        self.eps = eps
        self.scale = param(rngs, ones_init, (channels,), ("norm",), param_dtype)
        self.bias = param(rngs, zeros_init, (channels,), ("norm",), param_dtype)

    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        # Statistics as per-channel sums over H*W (contiguous rows in NHWC), then per group; the
        # output is one fused x * a + c with per-(B, C) coefficients. Same two-pass numerics as
        # reducing [B, HW, G, C/G] over axes (1, 3), but 3-4x faster forward+backward alone on
        # XLA CPU (64x16x16x128: 3.1 vs 13.1 ms); inside the bench UNet's step, where XLA fuses
        # the old form with its neighbours, the gain is only ~2% (1949 vs 1988 ms).
        B, H, W, C = x.shape
        g, cg = self.num_groups, C // self.num_groups
        xf = x.astype(jnp.float32).reshape(B, H * W, C)
        n = H * W * cg

        def per_group(per_channel):  # [B, C] -> [B, 1, C], the group's mean repeated per channel
            return jnp.repeat(jnp.sum(per_channel.reshape(B, g, cg), axis=-1) / n, cg, axis=1)[
                :, None, :
            ]

        mean = per_group(jnp.sum(xf, axis=1))
        var = per_group(jnp.sum(jnp.square(xf - mean), axis=1))
        a = jax.lax.rsqrt(var + self.eps) * self.scale[...]
        y = xf * a + (self.bias[...] - mean * a)
        return y.reshape(B, H, W, C).astype(x.dtype)


def timestep_embedding(
    t: Float[Array, " B"], dim: int, *, max_period: float = 10000.0
) -> Float[Array, "B D"]:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` with ``f = max_period ** (-i / (dim / 2))``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


class TimeEmbedding(nnx.Module):
    """``t -> Linear(silu(Linear(sinusoid(t))))``,
    plus a class embedding (the last id = null class)."""

    def __init__(
        self,
        freq_dim: int,
        out_dim: int,
        *,
        num_classes: int = 0,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(use_bias=True, param_dtype=param_dtype, rngs=rngs)
        self.freq_dim = freq_dim
        self.fc1 = Linear(
            freq_dim, out_dim, in_names=("channels_in",), out_names=("channels",), **kw
        )
        self.fc2 = Linear(
            out_dim, out_dim, in_names=("channels_in",), out_names=("channels",), **kw
        )
        self.class_embed = (
            param(
                rngs, fan_in_init(1), (num_classes + 1, out_dim), ("vocab", "channels"), param_dtype
            )
            if num_classes
            else None
        )

    def __call__(self, t: Float[Array, " B"], labels=None) -> Float[Array, "B D"]:
        e = self.fc2(jax.nn.silu(self.fc1(timestep_embedding(t, self.freq_dim))))
        if self.class_embed is not None:
            if labels is None:
                raise ValueError(
                    "TimeEmbedding: this model is class-conditional; "
                    "pass labels (num_classes = null)"
                )
            e = e + jnp.take(self.class_embed[...], labels, axis=0)
        return e


class ResBlock(nnx.Module):
    """ADM residual block: GN-SiLU-conv, scale-shift by the time embedding, GN-SiLU-dropout-conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        *,
        num_groups: int = 32,
        dropout: float = 0.0,
        conv_impl: ConvImpl = "auto",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(impl=conv_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(in_channels, num_groups, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = Conv2d(in_channels, out_channels, 3, **kw)
        self.emb = Linear(
            emb_dim,
            (2, out_channels),
            in_names=("channels_in",),
            out_names=(None, "channels"),
            use_bias=True,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.norm2 = GroupNorm(out_channels, num_groups, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = Conv2d(out_channels, out_channels, 3, zero_init=True, **kw)
        self.skip = (
            Conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        )
        self.dropout = dropout

    def __call__(self, x, emb, *, rng=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        scale, shift = jnp.moveaxis(self.emb(jax.nn.silu(emb)), 1, 0)
        h = self.norm2(h) * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
        h = self.conv2(dropout(jax.nn.silu(h), self.dropout, rng))
        skip = x if self.skip is None else self.skip(x)
        return constrain(skip + h, _IMAGE)


class AttentionBlock(nnx.Module):
    """Self-attention over the H*W positions (GroupNorm, QKV, ``mlgen.ops.attention``,
    zero-init out)."""

    def __init__(
        self,
        channels: int,
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
                f"AttentionBlock: {channels} channels are not divisible by head_dim={head_dim}"
            )
        n = channels // head_dim
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = GroupNorm(channels, num_groups, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Linear(
            channels,
            (3, n, head_dim),
            in_names=("channels_in",),
            out_names=(None, "heads", "head_dim"),
            **kw,
        )
        self.out = Linear(
            (n, head_dim),
            channels,
            in_names=("heads", "head_dim"),
            out_names=("channels",),
            init=zeros_init,
            **kw,
        )
        self.attention = attention or AttentionConfig()

    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        B, H, W, C = x.shape
        qkv = self.qkv(self.norm(x).reshape(B, H * W, C))  # [B, T, 3, N, Hd]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        o = ops.attention(q, k, v, config=self.attention)
        return x + self.out(o).reshape(B, H, W, C)


class Downsample(nnx.Module):
    """3x3 convolution with stride 2."""

    def __init__(
        self,
        channels: int,
        *,
        conv_impl: ConvImpl = "auto",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.conv = Conv2d(
            channels,
            channels,
            3,
            stride=2,
            impl=conv_impl,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(
        self,
        channels: int,
        *,
        conv_impl: ConvImpl = "auto",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.conv = Conv2d(
            channels, channels, 3, impl=conv_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x):
        B, H, W, C = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(
            B, 2 * H, 2 * W, C
        )
        return self.conv(x)
