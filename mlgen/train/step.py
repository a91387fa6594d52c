"""The one train step: ``make_train_step(loss_fn, optimizer) -> step(state, batch, rng)``.

It knows nothing of what it trains: language models, diffusion models and autoencoders all
come here with their ``loss(params, batch, rng) -> (loss, metrics)``.

The state is a plain dict ``{"step", "params", "opt_state"}`` plus ``"ema"`` (an exponential
moving average of the parameters) when EMA is on.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mlgen.train.task import LossFn

TrainState = dict[str, Any]


def init_state(params, optimizer: optax.GradientTransformation, *, ema: bool = False) -> TrainState:
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state


def ema_decay_at(step, decay: float, warmup: int):
    """``decay``, ramped as ``min(decay, (1 + step) / (10 + step))`` during ``warmup`` steps."""
    if warmup <= 0:
        return jnp.asarray(decay, jnp.float32)
    s = step.astype(jnp.float32)
    ramp = jnp.minimum(decay, (1.0 + s) / (10.0 + s))
    return jnp.where(step < warmup, ramp, decay)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, grad_accum_steps: int = 1,
                    lr_schedule: Callable | None = None, ema_decay: float = 0.0, ema_warmup: int = 0):
    """Returns the pure ``step(state, batch, rng) -> (state, metrics)``.

    ``rng`` is the run's base key; the step folds in its own step number, so a resumed run
    draws the same randomness. With ``grad_accum_steps = k`` the batch's leading dimension is
    split into k micro-batches whose gradients are averaged (a scan: one compiled body).
    """

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def compute_grads(params, batch, rng):
        if grad_accum_steps == 1:
            (loss, metrics), grads = grad_fn(params, batch, rng)
            return loss, metrics, grads

        micro = jax.tree.map(lambda x: x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:]),
                             batch)

        def body(carry, xs):
            i, mb = xs
            (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
            acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
            return acc, None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)))
        (loss, metrics), grads = zeros
        (loss, metrics, grads), _ = jax.lax.scan(body, (loss, metrics, grads),
                                                  (jnp.arange(grad_accum_steps), micro))
        scale = 1.0 / grad_accum_steps
        return loss * scale, jax.tree.map(lambda m: m * scale, metrics), jax.tree.map(lambda g: g * scale, grads)

    def step(state: TrainState, batch, rng) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(rng, state["step"])
        loss, metrics, grads = compute_grads(state["params"], batch, rng)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if "ema" in state:
            d = ema_decay_at(state["step"], ema_decay, ema_warmup)
            new["ema"] = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state["ema"], params)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state["step"])
        return new, metrics

    return step


def make_eval_step(loss_fn: LossFn):
    """``eval_step(params, batch, rng) -> metrics`` (with ``loss``)."""

    def eval_step(params, batch, rng):
        loss, metrics = loss_fn(params, batch, rng)
        return dict(metrics, loss=loss)

    return eval_step
