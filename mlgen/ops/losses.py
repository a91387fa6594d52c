"""Cross entropy over logits with integer labels, a loss mask and optional z-loss.

``chunked_cross_entropy`` computes the same from hidden states and a logits function, a
chunk of positions at a time, so the ``[B, T, V]`` logits never exist at once (forward or
backward): peak memory is ``B * chunk * V`` floats instead of ``B * T * V``.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from mlgen.typing import Array, Float, Int


def cross_entropy(
    logits: Float[Array, "B T V"],
    labels: Int[Array, "B T"],
    mask: Float[Array, "B T"] | None = None,
    *,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean token cross entropy over ``mask`` (float32 math), plus ``z_loss * mean(logsumexp^2)``.

    Returns ``(loss, metrics)`` with metrics ``ce`` (without z-loss), ``z_loss``, ``accuracy``
    and ``tokens`` (the mask's sum).
    """
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return _finish(_sums(logits, labels, mask), z_loss)


def chunked_cross_entropy(
    hidden: Float[Array, "B T D"],
    logits_fn: Callable[[jax.Array], jax.Array],
    labels: Int[Array, "B T"],
    mask: Float[Array, "B T"] | None = None,
    *,
    z_loss: float = 0.0,
    chunk: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``cross_entropy(logits_fn(hidden), labels, mask)``, ``chunk`` positions at a time.

    A ``lax.scan`` over ``T // chunk`` slices of the length axis; each step is rematerialised
    (``jax.checkpoint``), so the backward recomputes one chunk's logits at a time. Same value
    and gradients as the unchunked loss up to float32 summation order.
    """
    B, T, D = hidden.shape
    if chunk <= 0 or T % chunk:
        raise ValueError(f"chunk={chunk} must be a positive divisor of the length T={T}")
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = T // chunk

    def split(x):  # [B, T, ...] -> [n, B, chunk, ...]
        return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def step(acc, xs):
        h, y, m = xs
        return jax.tree.map(jnp.add, acc, _sums(logits_fn(h), y, m)), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(
        step,
        {"nll": zero, "zl": zero, "correct": zero, "tokens": zero},
        (split(hidden), split(labels), split(mask)),
    )
    return _finish(sums, z_loss)


def _sums(logits, labels, mask) -> dict[str, jax.Array]:
    """Masked sums of nll, logsumexp^2 and correct predictions (float32 math),
    and the token count."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {
        "nll": jnp.sum((lse - label_logit) * mask),
        "zl": jnp.sum(jnp.square(lse) * mask),
        "correct": jnp.sum(correct * mask),
        "tokens": jnp.sum(mask),
    }


def _finish(sums, z_loss: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    denom = jnp.maximum(sums["tokens"], 1.0)
    ce, zl = sums["nll"] / denom, sums["zl"] / denom
    metrics = {
        "ce": ce,
        "z_loss": zl,
        "accuracy": sums["correct"] / denom,
        "tokens": sums["tokens"],
    }
    return ce + z_loss * zl, metrics
