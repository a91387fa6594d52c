"""Rotary position embeddings (rotate-half / NeoX layout, as Llama), with Llama 3's
frequency scaling for long contexts."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from mlgen.typing import Array, Float, Int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama3Scaling:
    """Llama 3's RoPE frequency scaling (``rope_scaling.rope_type == "llama3"``).

    Frequencies whose wavelength is longer than ``original_max_len / low_freq_factor`` are
    divided by ``factor``; those shorter than ``original_max_len / high_freq_factor`` are kept;
    in between they blend linearly in ``original_max_len / wavelength``.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __call__(self, freqs: Float[Array, " F"]) -> Float[Array, " F"]:
        wavelength = 2 * math.pi / freqs
        ratio = self.original_max_len / wavelength  # how many wavelengths fit the old context
        blend = (ratio - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blend = jnp.clip(blend, 0.0, 1.0)  # 0: long wavelengths (scaled), 1: short ones (kept)
        return (1.0 - blend) * freqs / self.factor + blend * freqs


def rope_frequencies(
    head_dim: int, theta: float, scaling: Llama3Scaling | None = None
) -> Float[Array, " F"]:
    """The ``head_dim // 2`` rotation frequencies ``theta^(-2i/H)`` (scaled by ``scaling``)."""
    freqs = theta ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    return freqs if scaling is None else scaling(freqs)


def apply_rope(
    x: Float[Array, "B T N H"],
    positions: Int[Array, "B T"],
    *,
    theta: float = 10000.0,
    scaling: Llama3Scaling | None = None,
) -> Float[Array, "B T N H"]:
    """Rotates pairs (i, i + H/2) of ``x`` by ``positions * theta^(-2i/H)``."""
    H = x.shape[-1]
    if H % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {H}")
    freqs = rope_frequencies(H, theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
