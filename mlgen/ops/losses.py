"""Cross entropy over logits with integer labels, a loss mask and optional z-loss."""

import jax
import jax.numpy as jnp

from mlgen.typing import Array, Float, Int


def cross_entropy(logits: Float[Array, "B T V"], labels: Int[Array, "B T"], mask: Float[Array, "B T"] | None = None,
                  *, z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean token cross entropy over ``mask`` (float32 math), plus ``z_loss * mean(logsumexp^2)``.

    Returns ``(loss, metrics)`` with metrics ``ce`` (without z-loss), ``z_loss``, ``accuracy``
    and ``tokens`` (the mask's sum).
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = lse - label_logit
    mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    tokens = jnp.sum(mask)
    denom = jnp.maximum(tokens, 1.0)
    ce = jnp.sum(nll * mask) / denom
    zl = jnp.sum(jnp.square(lse) * mask) / denom
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    metrics = {"ce": ce, "z_loss": zl, "accuracy": jnp.sum(correct * mask) / denom, "tokens": tokens}
    return ce + z_loss * zl, metrics
