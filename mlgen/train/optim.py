"""Optax optimizer from config: AdamW, warmup + decay schedule, clipping, decay mask."""

from __future__ import annotations

from typing import Any, Callable

import jax
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


def make_optimizer(
    cfg: OptimConfig, num_steps: int
) -> tuple[optax.GradientTransformation, Callable]:
    """Returns ``(tx, schedule)``."""
    sched = lr_schedule(cfg, num_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            sched,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda p: decay_mask(p, cfg.no_decay),
        )
    )
    return optax.chain(*parts), sched
