"""Diffusion Transformer (Peebles & Xie 2023) in Flax NNX, NHWC in and out.

Supports:
- patchify (a ``p x p`` stride-``p`` projection) and unpatchify, fixed 2-D sin-cos positions;
- adaLN-Zero blocks built from the LM's own layers: ``mlgen.nn.attention.SelfAttention``
  (bidirectional, no RoPE, any ``mlgen.ops.attention`` backend) and ``mlgen.nn.mlp.MLP``
  (GELU), with shift / scale / gate from the conditioning vector, zero-initialised;
- stacked layers (one ``nnx.scan``, a leading ``layers`` axis on every block parameter), each
  block rematerialised by the run's policy (``mlgen.nn.policy``), which also sets the parameter
  and compute dtypes (norms, softmax and the output in float32);
- time and class conditioning (label ``num_classes`` = the null class for CFG);
- text conditioning (``context_dim`` > 0, :mod:`mlgen.models.text`), PixArt-alpha style: an
  owned text encoder (``text``) and a cross-attention sublayer in every block, between the
  self-attention and the MLP (``x += cross(LN(x), context)``, zero-initialised, no adaLN); the
  prompt comes as ``text_tokens=`` / ``text_mask=`` keyword arguments;
- low-resolution image conditioning for super-resolution (``low_res_channels``,
  ``low_res_size``; :mod:`mlgen.nn.lowres`): upsampled and concatenated to the input before
  patchifying, its noise-augmentation level embedded and added to the conditioning vector;
- ``learn_sigma``: twice the output channels (prediction, then the iDDPM variance
  interpolation), for importing / serving such models; the objectives here train none;
- logical-axis sharding: ``embed`` / ``heads`` / ``mlp`` like the LM, and the token axis as
  ``length``, so a mesh with ``seq > 1`` shards the patches (ring attention inside).

Called as ``model(x [B, H, W, C], time [B], labels [B] | None, rng=None) -> [B, H, W, C_out]``
(super-resolution: also ``low_res=[B, h, w, C_low], low_res_aug=[B]``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlgen.config import check, prefixed
from mlgen.models.family import Family, register
from mlgen.models.text import (
    TEXT_AXES,
    TEXT_BATCH_AXES,
    TextConditioner,
    TextConfig,
    check_text,
    text_trainable,
    with_text_axes,
)
from mlgen.nn import lowres
from mlgen.nn.attention import CrossAttention, SelfAttention
from mlgen.nn.conv import TimeEmbedding
from mlgen.nn.core import LayerNorm, Linear, dropout, zeros_init
from mlgen.nn.mlp import MLP
from mlgen.nn.policy import Policy
from mlgen.ops.attention import AttentionConfig
from mlgen.sharding import constrain
from mlgen.typing import Array, Float, Int

__all__ = ["FAMILY", "DiT", "DiTConfig", "PRESETS"]

_ACT = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig:
    image_size: int = 16
    in_channels: int = 1
    patch_size: int = 2
    d_model: int = 256
    num_layers: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    num_classes: int = 0
    learn_sigma: bool = False
    low_res_channels: int = 0  # super-resolution: channels of the low-res input (0 = none)
    low_res_size: int = 0  # its side (divides image_size)
    low_res_upsample: str = "bilinear"  # bilinear | nearest (to image_size, then concatenated)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    context_dim: int = 0  # text conditioning: the context width (0 = no text)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)  # used when context_dim
    # Dtypes and remat are the run's (``precision``, ``remat``: ``mlgen.nn.policy.Policy``).
    # Run the stacked blocks with a lax.scan (compile time independent of depth) or unrolled
    # (MaxText's ``scan_layers``). Unrolled is faster for small models on CPU: no per-layer
    # dynamic slices of the stacked weights and residuals (digits DiT: 293 vs 395 ms/step).
    scan_layers: bool = True

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def validate(self) -> None:
        check(self.patch_size >= 1, "patch_size", f"must be >= 1, got {self.patch_size}")
        check(
            self.image_size % self.patch_size == 0,
            "image_size",
            f"{self.image_size} is not divisible by patch_size={self.patch_size}",
        )
        check(self.in_channels > 0, "in_channels", f"must be > 0, got {self.in_channels}")
        check(self.num_layers >= 1, "num_layers", f"must be >= 1, got {self.num_layers}")
        check(
            self.num_heads >= 1 and self.d_model % self.num_heads == 0,
            "num_heads",
            f"{self.num_heads} does not divide d_model={self.d_model}",
        )
        check(
            (self.d_model // max(self.num_heads, 1)) % 2 == 0 and self.d_model % 4 == 0,
            "d_model",
            f"{self.d_model} must be a multiple of 4 with an even head size",
        )
        check(self.mlp_ratio > 0, "mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.num_classes >= 0, "num_classes", f"must be >= 0, got {self.num_classes}")
        lowres.check_fields(self)
        prefixed("attention", self.attention.validate)
        check_text(self.text, self.context_dim)

    @property
    def output_channels(self) -> int:  # the denoiser interface (mlgen.models.family)
        return self.out_channels

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PRESETS: dict[str, DiTConfig] = {
    "dit-digits": DiTConfig(patch_size=2, d_model=128, num_layers=4, num_heads=4, num_classes=10),
    "dit-S/2": DiTConfig(
        image_size=32, in_channels=4, patch_size=2, d_model=384, num_layers=12, num_heads=6
    ),
    "dit-B/2": DiTConfig(
        image_size=32, in_channels=4, patch_size=2, d_model=768, num_layers=12, num_heads=12
    ),
    "dit-tiny": DiTConfig(image_size=8, patch_size=2, d_model=32, num_layers=2, num_heads=2),
}


def sincos_2d(grid: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table ``[grid * grid, dim]`` (MAE / DiT)."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh, gw = np.meshgrid(
        np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij"
    )
    return np.concatenate([one_d(dim // 2, gh), one_d(dim // 2, gw)], axis=1).astype(np.float32)


def _modulate(x, shift, scale):
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nnx.Module):
    """adaLN-Zero: ``x += gate * f(LN(x) * (1 + scale) + shift)`` for attention, then the MLP."""

    def __init__(self, cfg: DiTConfig, *, policy: Policy, rngs: nnx.Rngs):
        dt, pdt = policy.dtype, policy.param_dtype
        d = cfg.d_model
        self.norm1 = LayerNorm(d, eps=1e-6, use_bias=False, use_scale=False)
        self.attn = SelfAttention(
            d,
            cfg.num_heads,
            cfg.num_heads,
            d // cfg.num_heads,
            use_bias=True,
            rope_theta=None,
            attention=cfg.attention,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )
        heads = (d, cfg.num_heads, cfg.num_heads, d // cfg.num_heads)
        self.cross_norm = (
            LayerNorm(d, eps=1e-6, use_bias=False, use_scale=False) if cfg.context_dim else None
        )
        self.cross = (
            CrossAttention(
                *heads,
                context_dim=cfg.context_dim,
                use_bias=True,
                zero_init_out=True,
                attention=cfg.attention,
                dtype=dt,
                param_dtype=pdt,
                rngs=rngs,
            )
            if cfg.context_dim
            else None
        )
        self.norm2 = LayerNorm(d, eps=1e-6, use_bias=False, use_scale=False)
        self.mlp = MLP(
            d,
            int(d * cfg.mlp_ratio),
            kind="gelu",
            use_bias=True,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )
        # The modulation outputs stay replicated: "embed" is already the input's (fsdp) axis.
        self.ada = Linear(
            d,
            (6, d),
            in_names=("embed",),
            out_names=(None, None),
            use_bias=True,
            init=zeros_init,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )
        self.dropout = cfg.dropout

    def __call__(self, x, c, rng=None, context=None, context_mask=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.moveaxis(self.ada(jax.nn.silu(c)), 1, 0)
        r1, r2 = jax.random.split(rng) if rng is not None else (None, None)
        h = self.attn(_modulate(self.norm1(x), shift1, scale1), positions=None, causal=False)
        x = x + gate1[:, None, :] * dropout(h, self.dropout, r1)
        if self.cross is not None:
            x = x + self.cross(
                self.cross_norm(x), context.astype(x.dtype), context_mask=context_mask
            )
        h = self.mlp(_modulate(self.norm2(x), shift2, scale2))
        x = x + gate2[:, None, :] * dropout(h, self.dropout, r2)
        return constrain(x, _ACT)


class DiT(nnx.Module):
    """``policy``: parameter / compute dtypes and the remat of each block (default: float32,
    none)."""

    def __init__(self, cfg: DiTConfig, *, policy: Policy = Policy(), rngs: nnx.Rngs):
        cfg.validate()
        self.cfg, self.policy = cfg, policy
        dt, pdt = policy.dtype, policy.param_dtype
        p, d = cfg.patch_size, cfg.d_model
        self.low_res = (
            lowres.LowResInput(
                cfg.low_res_channels,
                cfg.low_res_size,
                cfg.image_size,
                d,
                freq_dim=256,
                method=cfg.low_res_upsample,
                param_dtype=pdt,
                rngs=rngs,
            )
            if cfg.low_res_channels
            else None
        )
        self.patch = Linear(
            (p, p, cfg.in_channels + cfg.low_res_channels),
            d,
            in_names=("kernel", "kernel", "channels_in"),
            out_names=("embed",),
            use_bias=True,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )
        self.time = TimeEmbedding(256, d, num_classes=cfg.num_classes, param_dtype=pdt, rngs=rngs)
        self.text = (
            TextConditioner(cfg.text, cfg.context_dim, pooled_dim=d, policy=policy, rngs=rngs)
            if cfg.context_dim
            else None
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return DiTBlock(cfg, policy=policy, rngs=r)

        self.blocks = make_blocks(rngs)
        self.final_norm = LayerNorm(d, eps=1e-6, use_bias=False, use_scale=False)
        self.final_ada = Linear(
            d,
            (2, d),
            in_names=("embed",),
            out_names=(None, None),
            use_bias=True,
            init=zeros_init,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )
        self.out = Linear(
            d,
            (p, p, cfg.out_channels),
            in_names=("embed",),
            out_names=(None, None, None),
            use_bias=True,
            init=zeros_init,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )

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
        """Denoiser output; a text-conditioned model also takes the prompt ``text_tokens`` /
        ``text_mask`` ``[B, S]`` (all padding = the learned null condition)."""
        cfg = self.cfg
        dt = self.policy.dtype
        c = self.time(time, labels)
        if self.low_res is not None:
            x, aug_emb = self.low_res(x, low_res, low_res_aug)
            c = c + aug_emb
        c = c.astype(dt)
        B, H, W, C = x.shape
        p = cfg.patch_size
        g = H // p
        tokens = (
            x.astype(dt)
            .reshape(B, g, p, g, p, C)
            .transpose(0, 1, 3, 2, 4, 5)
            .reshape(B, g * g, p, p, C)
        )
        h = self.patch(tokens) + jnp.asarray(sincos_2d(g, cfg.d_model), dt)[None]
        h = constrain(h, _ACT)
        ctx = ctx_mask = None
        if self.text is not None:
            if text_tokens is None or text_mask is None:
                raise ValueError("DiT: this model is text-conditioned; pass text_tokens, text_mask")
            ctx, ctx_mask, pooled = self.text(text_tokens, text_mask)
            if pooled is not None:
                c = c + pooled.astype(dt)
        layer_rngs = (
            jax.random.split(rng, cfg.num_layers) if rng is not None and cfg.dropout > 0 else None
        )

        body = self.policy.remat_block(  # inside the layer scan
            lambda block, h, c, r: block(h, c, r, ctx, ctx_mask), prevent_cse=False
        )

        @nnx.scan(
            in_axes=(0, nnx.Carry, 0),
            out_axes=nnx.Carry,
            unroll=1 if cfg.scan_layers else True,
            transform_metadata={nnx.PARTITION_NAME: "layers"},
        )
        def run(block, h, r):
            return body(block, h, c, r)

        h = run(self.blocks, h, layer_rngs)
        shift, scale = jnp.moveaxis(self.final_ada(jax.nn.silu(c)), 1, 0)
        # [B, P, p, p, C_out], accumulated in float32 (the loss's prediction) whatever dt is.
        out = self.out(_modulate(self.final_norm(h), shift, scale), out_dtype=jnp.float32)
        co = cfg.out_channels
        out = out.reshape(B, g, g, p, p, co).transpose(0, 1, 3, 2, 4, 5).reshape(B, H, W, co)
        return out.astype(jnp.float32)


def _check_mesh(cfg: DiTConfig, shards) -> None:
    n = shards("length")
    check(
        cfg.num_tokens % n == 0,
        "patch_size",
        f"{cfg.num_tokens} patch tokens ((image_size / patch_size)^2) do not split into the "
        f"{n} shards of the length axis",
    )
    n = shards("heads")
    check(
        cfg.num_heads % n == 0,
        "num_heads",
        f"{cfg.num_heads} is not divisible by the {n} shards of the heads axis",
    )


def dit_flops_per_token(cfg: DiTConfig, num_tokens: int | None = None) -> float:
    """Training FLOPs per patch token of a DiT (forward + backward), counted as
    ``mlgen.models.transformer.transformer_flops_per_token`` counts them.

    Per token: ``6 * (L * (4 D^2 + 2 D F) + p^2 C D + D p^2 C_out)`` (q, k, v, o and the
    GELU MLP per layer; the patch embedding and the output projection) plus bidirectional
    attention ``12 * L * P * D``; plus the per-image conditioning matmuls spread over the
    ``P`` tokens of an image, ``6 * (L * 6 D^2 + 2 D^2 + 256 D + D^2) / P`` (each block's
    adaLN, the final adaLN, the two-layer time MLP on a 256-wide sinusoid).

    Args:
      cfg: a ``mlgen.models.dit.DiTConfig`` (read: ``d_model``, ``num_layers``,
        ``mlp_ratio``, ``patch_size``, ``in_channels``, ``out_channels``, ``num_tokens``).
      num_tokens: ``P``; None = ``cfg.num_tokens``.
    """
    P = cfg.num_tokens if num_tokens is None else num_tokens
    D, L, p = cfg.d_model, cfg.num_layers, cfg.patch_size
    F = int(D * cfg.mlp_ratio)
    per_token = L * (4 * D * D + 2 * D * F) + p * p * (cfg.in_channels + cfg.out_channels) * D
    per_image = L * 6 * D * D + 2 * D * D + 256 * D + D * D
    return 6.0 * (per_token + per_image / P) + 12.0 * L * P * D


def dit_flops_per_pixel(cfg: DiTConfig, pixels: int) -> float:
    """Training FLOPs per image pixel of a DiT: :func:`dit_flops_per_token` over the
    ``pixels / p^2`` patch tokens of an image, divided by the ``p^2`` pixels of a patch (the
    denoiser families' ``Family.flops_per_token`` counts per pixel)."""
    p2 = cfg.patch_size**2
    return dit_flops_per_token(cfg, pixels // p2) / p2


# The DiT's own logical axes (a text-conditioned one adds TEXT_AXES).
_AXES = frozenset(
    {
        "layers",
        "embed",
        "heads",
        "kv_heads",
        "head_dim",
        "mlp",
        "kernel",
        "channels",
        "channels_in",
        "vocab",
        "batch",
        "length",
        "act_embed",
        "act_heads",
        "act_kv_heads",
        "act_mlp",
    }
)

FAMILY = register(
    Family(
        name="dit",
        config=DiTConfig,
        kind="denoiser",
        build=lambda cfg, rngs, policy: DiT(cfg, policy=policy, rngs=rngs),
        batch_axes={"labels": ("batch",), **TEXT_BATCH_AXES},
        logical_axes=_AXES | TEXT_AXES,
        axes_of=with_text_axes(_AXES),
        trainable=text_trainable,
        check=_check_mesh,
        renamed={"attention_backend": "attention.backend"},
        flops_per_token=dit_flops_per_pixel,
    )
)
