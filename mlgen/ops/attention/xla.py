"""``jax.nn.dot_product_attention``: XLA everywhere, cuDNN on GPU when it can.

Differentiated by autodiff. The mask follows ``reference.make_mask`` (queries are the last
T of S positions), so it is passed explicitly whenever ``jax``'s own ``is_causal`` (which
aligns query 0 with key 0) would differ. Rows with nothing to attend to are zeroed, as in
the reference (``jax.nn.dot_product_attention`` would average V over them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlgen.ops.attention import reference
from mlgen.typing import Array, Float


def attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    segment_ids=None,
    sliding_window: int | None = None,
    scale: float | None = None,
    interpret: bool = False,
    implementation: str | None = None,
) -> Float[Array, "B T N H"]:
    """Same contract as ``reference.attention``; ``implementation`` is passed to JAX."""
    del interpret
    T, S = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if causal and T == S and sliding_window is None and segment_ids is None:
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation=implementation
        )
    mask = reference.make_mask(
        T, S, causal=causal, segment_ids=segment_ids, sliding_window=sliding_window
    )
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=scale, implementation=implementation
    )
    if causal and T <= S and segment_ids is None:
        return out  # every query sees at least itself
    seen = jnp.any(mask, axis=-1)  # [B or 1, T]
    return jnp.where(seen[:, :, None, None], out, jnp.zeros((), out.dtype))
