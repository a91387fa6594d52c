"""Optax optimizer from config: AdamW, warmup + decay schedule, clipping, decay mask, and the
dtype its state is stored in (``precision.optimizer``)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mlgen.config import OptimConfig


def lr_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr`` then cosine / linear decay to ``lr * min_lr_ratio`` (or constant)."""
    decay_steps = cfg.decay_steps or num_steps
    warm = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    rest = max(decay_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, rest)
    else:
        after = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return after
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def decay_mask(params: Any, no_decay: tuple[str, ...]) -> Any:
    """True where weight decay applies: leaves whose path names none of ``no_decay``."""

    def keep(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path).lower()
        return not any(s in name for s in no_decay)

    return jax.tree_util.tree_map_with_path(keep, params)


def scale_by_adam_stored_in(
    dtype, *, b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` with both moments stored in ``dtype`` and the update math in float32.

    (optax's ``mu_dtype`` covers only the first moment, and its moments otherwise follow the
    parameters' dtype.) The state is optax's own ``ScaleByAdamState``, so checkpoints keep their
    structure; with float32 moments and gradients every cast is a no-op and the numbers are
    optax's bit for bit. The updates come out in float32 (``optax.apply_updates`` adds them to
    the parameters in float32 and rounds once to the parameters' dtype).
    """
    inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def stored(state, to):
        return state._replace(mu=optax.tree.cast(state.mu, to), nu=optax.tree.cast(state.nu, to))

    def init(params):
        return stored(inner.init(params), dtype)

    def update(updates, state, params=None):
        del params
        updates, state = inner.update(
            optax.tree.cast(updates, jnp.float32), stored(state, jnp.float32)
        )
        return updates, stored(state, dtype)

    return optax.GradientTransformation(init, update)


def make_optimizer(
    cfg: OptimConfig, num_steps: int, *, state_dtype: str = "float32"
) -> tuple[optax.GradientTransformation, Callable]:
    """Returns ``(tx, schedule)``: AdamW whose moments are stored in ``state_dtype``."""
    sched = lr_schedule(cfg, num_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    # optax.adamw's own chain (same state tree: old checkpoints restore), the moments' dtype set.
    parts.append(
        optax.chain(
            scale_by_adam_stored_in(jnp.dtype(state_dtype), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.add_decayed_weights(cfg.weight_decay, lambda p: decay_mask(p, cfg.no_decay)),
            optax.scale_by_learning_rate(sched),
        )
    )
    return optax.chain(*parts), sched
