"""Diffusion samplers: DDPM, DDIM, Euler and Heun, with classifier-free guidance.

Supports:
- ``ddpm``: ancestral sampling from the posterior ``q(x_s | x_t, x0_hat)`` ("fixed small"
  variance, as diffusers' ``DDPMScheduler``);
- ``ddim``: DDIM with ``eta`` (0 = deterministic, 1 = DDPM's variance);
- ``euler``: the probability-flow ODE (= DDIM with eta 0; the rectified-flow ODE in t);
- ``heun``: Heun's second-order method on the same ODE (in ``sigma / alpha`` for VP
  schedules, as EDM; in ``t`` for the flow path), Euler on the last step (and, for VP, on
  the first, whose interval reaches up to ``sigma / alpha = 2e4``);
- every prediction type (eps, x0, v, flow) and schedule of ``mlgen.objectives``;
- classifier-free guidance ``u + w (c - u)``: ``w = 0`` is the unconditional model, ``w = 1``
  the conditional one (a single model call per step then);
- ONE ``lax.scan`` per sampling run over a static ``max_steps``; the number of steps, the
  guidance scale and eta are traced, so changing them never recompiles.

Samplers take a model (``graphdef`` + its state), never a run: ``mlgen sample WORKDIR`` is in
``mlgen.cli``.

The time grid is uniform in t from 1 to 0: with ``steps = num_train_timesteps`` a VP
schedule visits exactly its training table (diffusers' DDPM chain).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlgen.objectives import bind
from mlgen.objectives import schedules as schedules_lib
from mlgen.objectives.diffusion import SAMPLERS, SamplerConfig, to_x0_eps
from mlgen.typing import Array, Float

__all__ = ["SAMPLERS", "SamplerConfig", "grid_labels", "sample", "sample_fn", "sample_model"]

# (x [B, ...], model time [B], labels [B] | None) -> raw model output [B, ...]
DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


# ----------------------------------------------------------------------------- core
def _guided(denoise: DenoiseFn, x, mt, labels, guidance, null_label: int):
    """The model output with classifier-free guidance (one call when guidance == 1 or no labels)."""
    if labels is None:
        return denoise(x, mt, None)

    def cond_only(_):
        return denoise(x, mt, labels)

    def both(_):
        xx = jnp.concatenate([x, x])
        ll = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
        out = denoise(xx, jnp.concatenate([mt, mt]), ll)
        c, u = jnp.split(out, 2)
        return u + guidance * (c - u)

    return jax.lax.cond(guidance == 1.0, cond_only, both, None)


def sample_fn(
    denoise: DenoiseFn,
    schedule: schedules_lib.Schedule,
    *,
    prediction: str,
    sampler: str,
    x_T: jax.Array,
    key: jax.Array,
    steps,
    labels=None,
    guidance=1.0,
    eta=0.0,
    null_label: int = 0,
    clip: bool = True,
    max_steps: int = 1000,
) -> jax.Array:
    """Runs a sampler from ``x_T`` (noise at t = 1) to t = 0. Traceable; one ``lax.scan``.

    Args:
      denoise: ``(x, model_time [B], labels | None) -> output`` in ``prediction`` space.
      schedule: the noise schedule the model was trained with.
      prediction: ``eps`` | ``x0`` | ``v`` | ``flow``.
      sampler: one of ``SAMPLERS``.
      x_T: ``[B, ...]`` starting noise.
      key: randomness of ``ddpm`` / ``ddim`` (eta > 0).
      steps: number of steps (traced int, 1..max_steps).
      labels: ``[B]`` ints or None (unconditional model); ``null_label`` is the dropped class.
      guidance, eta: traced floats.
      clip: clip x0 estimates to [-1, 1].
      max_steps: static scan length.

    Returns:
      Samples ``[B, ...]`` at t = 0.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sample: unknown sampler {sampler!r}; choose from {SAMPLERS}")
    steps = jnp.clip(jnp.asarray(steps, jnp.int32), 1, max_steps)
    guidance = jnp.asarray(guidance, jnp.float32)
    eta = jnp.asarray(
        1.0 if sampler == "ddpm" else (eta if sampler == "ddim" else 0.0), jnp.float32
    )
    B = x_T.shape[0]
    flow = schedule.kind == "flow"

    def predict(x, t):
        mt = jnp.full((B,), schedule.model_time(t), jnp.float32)
        out = _guided(denoise, x, mt, labels, guidance, null_label).astype(jnp.float32)
        a, s = schedule.alpha(t), schedule.sigma(t)
        x0, eps = to_x0_eps(out, x, a, s, prediction)
        if clip:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = (x - a * x0) / jnp.maximum(s, 1e-12)  # consistent with the clipped x0
        return x0, eps

    def ddim_step(x, t, s_, k):
        x0, eps = predict(x, t)
        a_t, s_t, a_s, s_s = (
            schedule.alpha(t),
            schedule.sigma(t),
            schedule.alpha(s_),
            schedule.sigma(s_),
        )
        # DDPM posterior std of x_s given (x_t, x0), times eta (Song et al.'s sigma_eta).
        var_ts = jnp.maximum(s_t**2 - (a_t / jnp.maximum(a_s, 1e-12)) ** 2 * s_s**2, 0.0)
        std = eta * jnp.sqrt(var_ts) * s_s / jnp.maximum(s_t, 1e-12)
        noise = jax.random.normal(k, x.shape, x.dtype)
        return a_s * x0 + jnp.sqrt(jnp.maximum(s_s**2 - std**2, 0.0)) * eps + std * noise

    def heun_step(x, t, s_, is_last):
        x0, e1 = predict(x, t)
        a_t, s_t, a_s, s_s = (
            schedule.alpha(t),
            schedule.sigma(t),
            schedule.alpha(s_),
            schedule.sigma(s_),
        )
        x_euler = a_s * x0 + s_s * e1

        def correct(_):
            x0b, e2 = predict(x_euler, s_)
            if flow:  # dx/dt = eps - x0, trapezoid in t
                return x + (s_ - t) * 0.5 * ((e1 - x0) + (e2 - x0b))
            # d(x / alpha) / d(sigma / alpha) = eps, trapezoid in sigma / alpha
            return a_s * (x / a_t + (s_s / a_s - s_t / a_t) * 0.5 * (e1 + e2))

        return jax.lax.cond(is_last, lambda _: x_euler, correct, None)

    def body(x, i):
        def step(x):
            t = 1.0 - i.astype(jnp.float32) / steps
            s_ = jnp.maximum(1.0 - (i + 1).astype(jnp.float32) / steps, 0.0)
            if sampler == "heun":
                # VP: the first step leaves sigma/alpha = sigma_max (2e4 for the capped cosine);
                # a trapezoid over [sigma_1, sigma_max] overweights the end point, Euler does not.
                euler_only = (i + 1 == steps) | ((i == 0) & (not flow))
                return heun_step(x, t, s_, euler_only)
            return ddim_step(x, t, s_, jax.random.fold_in(key, i))

        return jax.lax.cond(i < steps, step, lambda x: x, x), None

    x, _ = jax.lax.scan(body, x_T.astype(jnp.float32), jnp.arange(max_steps))
    return x


# Incremented each time the jitted sampler is traced
# (tests check that steps / guidance do not retrace).
TRACE_COUNT = {"sample": 0}


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "schedule_name",
        "num_train_steps",
        "prediction",
        "sampler",
        "shape",
        "clip",
        "max_steps",
        "null_label",
    ),
)
def _sample_jit(
    params,
    model_state,
    key,
    labels,
    steps,
    guidance,
    eta,
    *,
    graphdef,
    schedule_name,
    num_train_steps,
    prediction,
    sampler,
    shape,
    clip,
    max_steps,
    null_label,
):
    TRACE_COUNT["sample"] += 1
    schedule = _schedule(schedule_name, num_train_steps)
    k_noise, k_sample = jax.random.split(key)
    x_T = jax.random.normal(k_noise, shape, jnp.float32)

    def denoise(
        x, t, y
    ):  # merged inside the scan / cond trace: NNX transforms (DiT's scan) need that
        return bind(graphdef, params, model_state)(x, t, y)

    return sample_fn(
        denoise,
        schedule,
        prediction=prediction,
        sampler=sampler,
        x_T=x_T,
        key=k_sample,
        steps=steps,
        labels=labels,
        guidance=guidance,
        eta=eta,
        null_label=null_label,
        clip=clip,
        max_steps=max_steps,
    )


@functools.lru_cache(maxsize=None)
def _schedule(name: str, n: int) -> schedules_lib.Schedule:
    return schedules_lib.make(name, n)


def sample(
    graphdef: nnx.GraphDef,
    params,
    *,
    schedule: str,
    num_train_timesteps: int = 1000,
    prediction: str,
    shape: tuple[int, ...],
    key: jax.Array,
    labels=None,
    num_classes: int = 0,
    sampler: str = "ddim",
    steps: int = 50,
    guidance: float = 1.0,
    eta: float = 0.0,
    clip: bool = True,
    max_steps: int = 1000,
    model_state=None,
) -> Float[Array, "B H W C"]:
    """Samples images from a denoiser given explicitly as ``(graphdef, params[, model_state])``.

    ``shape`` is ``(B, H, W, C)``; ``labels`` ``[B]`` ints for a class-conditional model
    (``num_classes`` = its null label). Compiled once per (model, shape, sampler, schedule);
    ``steps``, ``guidance``, ``eta``, ``key``, ``labels`` and ``params`` never recompile.
    Call under ``mlgen.sharding.use(mesh, rules)`` for sharded params.
    """
    if labels is not None:
        labels = jnp.asarray(labels, jnp.int32)
    return _sample_jit(
        params,
        model_state or {},
        key,
        labels,
        jnp.int32(steps),
        jnp.float32(guidance),
        jnp.float32(eta),
        graphdef=graphdef,
        schedule_name=schedule,
        num_train_steps=num_train_timesteps,
        prediction=prediction,
        sampler=sampler,
        shape=tuple(shape),
        clip=clip,
        max_steps=max_steps,
        null_label=num_classes,
    )


def sample_model(
    graphdef,
    params,
    objective,
    model_cfg,
    sampler_cfg: SamplerConfig,
    *,
    num: int,
    key: jax.Array,
    labels=None,
    model_state=None,
    **overrides,
):
    """:func:`sample` with the settings of a run's objective, sampler and denoiser configs
    (``model_cfg``: ``image_size``, ``in_channels``, ``num_classes``)."""
    kw = dict(
        sampler=sampler_cfg.sampler,
        steps=sampler_cfg.steps,
        guidance=sampler_cfg.guidance,
        eta=sampler_cfg.eta,
        clip=sampler_cfg.clip,
        max_steps=sampler_cfg.max_steps,
    )
    kw.update(overrides)
    size = model_cfg.image_size
    return sample(
        graphdef,
        params,
        schedule=objective.schedule,
        num_train_timesteps=objective.num_train_timesteps,
        prediction=objective.prediction,
        shape=(num, size, size, model_cfg.in_channels),
        key=key,
        labels=labels,
        num_classes=model_cfg.num_classes,
        model_state=model_state,
        **kw,
    )


def grid_labels(num_classes: int, per_class: int) -> np.ndarray:
    """``[0]*per_class + [1]*per_class + ...``: one grid row per class."""
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
