"""Rotary position embeddings (rotate-half / NeoX layout, as Llama)."""

import jax.numpy as jnp

from mlgen.typing import Array, Float, Int


def apply_rope(
    x: Float[Array, "B T N H"], positions: Int[Array, "B T"], *, theta: float = 10000.0
) -> Float[Array, "B T N H"]:
    """Rotates pairs (i, i + H/2) of ``x`` by ``positions * theta^(-2i/H)``."""
    H = x.shape[-1]
    if H % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {H}")
    freqs = theta ** (-jnp.arange(0, H // 2, dtype=jnp.float32) * 2.0 / H)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
