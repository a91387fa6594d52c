"""The one train step: ``make_train_step(loss_fn, optimizer) -> step(state, batch, rng)``.

It knows nothing of what it trains: language models, diffusion models and autoencoders all
come here with their ``loss(params, model_state, batch, rng) -> (loss, (metrics, model_state))``.

The state is a plain dict ``{"step", "params", "model_state", "opt_state"}`` plus ``"ema"`` (an
exponential moving average of the parameters) when EMA is on. ``model_state`` holds the
model's non-trainable variables (batch statistics, counters), threaded through the loss.

A step whose loss or gradient is not finite changes nothing but the step counter (the
divergence guard, :func:`keep_if`, inside the compiled step: no host round trip) and reports
``skipped = 1`` in its metrics; the trainer stops the run after ``train.max_bad_steps`` in a
row. The counter still moves so that checkpoint numbers, the data position and the per-step
randomness stay one and the same count of batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mlgen.train.task import LossFn, TrainStep

TrainState = dict[str, Any]
Trainable = Callable[[str], bool] | None


def trainable_part(tree: Any, trainable: Trainable) -> Any:
    """``tree`` (shaped like the parameters) with the frozen leaves replaced by None: what the
    gradient is taken of and the optimizer sees (``trainable``: a predicate on a leaf's
    ``/``-joined path; None = every leaf trains)."""
    if trainable is None:
        return tree
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x if trainable(jax.tree_util.keystr(path, simple=True, separator="/")) else None
        ),
        tree,
    )


def with_part(full: Any, part: Any) -> Any:
    """``full`` with the leaves of ``part`` (a :func:`trainable_part`) put in."""
    return jax.tree.map(lambda p, f: f if p is None else p, part, full, is_leaf=lambda x: x is None)


def init_state(
    params,
    optimizer: optax.GradientTransformation,
    *,
    model_state: Any = None,
    ema: bool = False,
    trainable: Trainable = None,
) -> TrainState:
    """The train state at step 0; the optimizer state covers the trainable parameters only."""
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "model_state": {} if model_state is None else model_state,
        "opt_state": optimizer.init(trainable_part(params, trainable)),
    }
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state


def state_shardings(
    optimizer: optax.GradientTransformation,
    abstract: TrainState,
    param_sh,
    model_state_sh,
    mesh,
    *,
    trainable: Trainable = None,
) -> dict:
    """Shardings of :func:`init_state`'s dict: optimizer moments where their parameters live."""
    replicated = NamedSharding(mesh, P())
    found = {}

    def opt_shardings():
        # tree_map_params runs the optimizer's init; traced (not eager) so that nothing is put
        # on the mesh's devices, which may be a TPU slice that is only compiled for (mlgen plan).
        found["sh"] = optax.tree_map_params(
            optimizer,
            lambda _, s: s,
            abstract["opt_state"],
            trainable_part(param_sh, trainable),
            transform_non_params=lambda _: replicated,
        )
        return 0

    jax.eval_shape(opt_shardings)
    out = {
        "step": replicated,
        "params": param_sh,
        "model_state": model_state_sh,
        "opt_state": found["sh"],
    }
    if "ema" in abstract:
        out["ema"] = param_sh
    return out


def ema_decay_at(step, decay: float, warmup: int):
    """``decay``, ramped as ``min(decay, (1 + step) / (10 + step))`` during ``warmup`` steps."""
    if warmup <= 0:
        return jnp.asarray(decay, jnp.float32)
    s = step.astype(jnp.float32)
    ramp = jnp.minimum(decay, (1.0 + s) / (10.0 + s))
    return jnp.where(step < warmup, ramp, decay)


def keep_if(ok, new: TrainState, old: TrainState) -> TrainState:
    """``new`` where the scalar ``ok`` is true, else ``old`` (its ``step`` counter advanced):
    the divergence guard, a select over the state inside the jitted step. A task that brings
    its own step can guard it with this too."""
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    if "step" in old:
        kept["step"] = old["step"] + 1
    return kept


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    lr_schedule: Callable | None = None,
    ema_decay: float = 0.0,
    ema_warmup: int = 0,
    trainable: Trainable = None,
):
    """Returns the pure ``step(state, batch, rng) -> (state, metrics)``.

    ``rng`` is the run's base key; the step folds in its own step number, so a resumed run
    draws the same randomness. With ``grad_accum_steps = k`` the batch's leading dimension is
    split into k micro-batches whose gradients are averaged (a scan: one compiled body); the
    model state runs through the micro-batches in order.

    ``trainable`` (a predicate on a parameter's path; None = all): the gradient is taken of
    those parameters only and the optimizer updates only them (its state, from
    :func:`init_state` with the same ``trainable``, holds nothing for the others); the frozen
    ones are carried through unchanged, bit for bit (LoRA's base). ``grad_norm`` is the
    trainable parameters' gradient norm.
    """

    def compute_grads(full, params, model_state, batch, rng):
        # Differentiates with respect to ``params`` (the trainable part of ``full``) only.
        if trainable is None:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        else:
            grad_fn = jax.value_and_grad(
                lambda p, *rest: loss_fn(with_part(full, p), *rest), has_aux=True
            )
        if grad_accum_steps == 1:
            (loss, (metrics, model_state)), grads = grad_fn(params, model_state, batch, rng)
            return loss, metrics, grads, model_state

        micro = jax.tree.map(
            lambda x: x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:]),
            batch,
        )

        def body(carry, xs):
            acc, ms = carry
            i, mb = xs
            (loss, (metrics, ms)), grads = grad_fn(params, ms, mb, jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, acc, (loss, metrics, grads)), ms), None

        first = jax.tree.map(lambda x: x[0], micro)
        (loss, (metrics, _)), grads = jax.eval_shape(
            lambda: grad_fn(params, model_state, first, rng)
        )
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (loss, metrics, grads))
        ((loss, metrics, grads), model_state), _ = jax.lax.scan(
            body, (zeros, model_state), (jnp.arange(grad_accum_steps), micro)
        )
        scale = 1.0 / grad_accum_steps
        return (
            loss * scale,
            jax.tree.map(lambda m: m * scale, metrics),
            jax.tree.map(lambda g: g * scale, grads),
            model_state,
        )

    def step(state: TrainState, batch, rng) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(rng, state["step"])
        full = state["params"]
        part = trainable_part(full, trainable)
        loss, metrics, grads, model_state = compute_grads(
            full, part, state["model_state"], batch, rng
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], part)
        params = with_part(full, optax.apply_updates(part, updates))
        new = {
            "step": state["step"] + 1,
            "params": params,
            "model_state": model_state,
            "opt_state": opt_state,
        }
        if "ema" in state:
            d = ema_decay_at(state["step"], ema_decay, ema_warmup)
            new["ema"] = jax.tree.map(
                lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state["ema"], params
            )
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32))
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state["step"])
        return keep_if(ok, new, state), metrics

    return step


def default_step(
    make_loss: Callable[[Any], LossFn],
    optimizer: optax.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    lr_schedule: Callable | None = None,
    ema_decay: float = 0.0,
    ema_warmup: int = 0,
    trainable: Trainable = None,
) -> TrainStep:
    """The :class:`TrainStep` of one optax optimizer over ``make_loss(graphdef)``
    (every built-in task); ``trainable`` as in :func:`make_train_step`."""
    ema = ema_decay > 0
    return TrainStep(
        init=lambda params, model_state: init_state(
            params, optimizer, model_state=model_state, ema=ema, trainable=trainable
        ),
        shardings=lambda abstract, p_sh, s_sh, mesh: state_shardings(
            optimizer, abstract, p_sh, s_sh, mesh, trainable=trainable
        ),
        make=lambda graphdef: make_train_step(
            make_loss(graphdef),
            optimizer,
            grad_accum_steps=grad_accum_steps,
            lr_schedule=lr_schedule,
            ema_decay=ema_decay,
            ema_warmup=ema_warmup,
            trainable=trainable,
        ),
    )


def make_eval_step(loss_fn: LossFn):
    """``eval_step(params, model_state, batch, rng) -> metrics`` (with ``loss``)."""

    def eval_step(params, model_state, batch, rng):
        loss, (metrics, _) = loss_fn(params, model_state, batch, rng)
        return dict(metrics, loss=loss)

    return eval_step
