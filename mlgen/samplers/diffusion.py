"""Diffusion samplers: DDPM, DDIM, Euler, Heun and DPM-Solver++(2M), with classifier-free guidance.

Supports:
- ``ddpm``: ancestral sampling from the posterior ``q(x_s | x_t, x0_hat)`` ("fixed small"
  variance, as diffusers' ``DDPMScheduler``);
- ``ddim``: DDIM with ``eta`` (0 = deterministic, 1 = DDPM's variance);
- ``euler``: the probability-flow ODE (= DDIM with eta 0; the rectified-flow ODE in t);
- ``heun``: Heun's second-order method on the same ODE (in ``sigma / alpha`` for VP
  schedules, as EDM; in ``t`` for the flow path), Euler on the last step (and, for VP, on
  the first, whose interval reaches up to ``sigma / alpha = 2e4``);
- ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order solver of the
  same ODE in data prediction and log-SNR ``lambda = log(alpha / sigma)`` (diffusers'
  ``DPMSolverMultistepScheduler`` default): one model call per step, first order on the first
  step (no history yet) and on the last (``lower_order_final``; the step to ``sigma = 0`` has
  ``h = inf``);
- every prediction type (eps, x0, v, flow) and schedule of ``mlgen.objectives``;
- classifier-free guidance ``u + w (c - u)``: ``w = 0`` is the unconditional model, ``w = 1``
  the conditional one (a single model call per step then);
- guidance rescale ``phi`` (Lin et al. 2023, sec. 3.4; diffusers' ``guidance_rescale``): the
  guided output is rescaled to the conditional output's per-sample std and blended by ``phi``
  (0 = off), in the model's prediction space as diffusers does; every sampler;
- ONE ``lax.scan`` per sampling run over a static ``max_steps``; the number of steps, the
  guidance scale, guidance rescale and eta are traced, so changing them never recompiles.

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

__all__ = [
    "SAMPLERS",
    "SamplerConfig",
    "grid_labels",
    "guide",
    "sample",
    "sample_fn",
    "sample_model",
]

# (x [B, ...], model time [B], labels [B] | None, cond {name: [B, ...]}) -> raw output [B, ...]
# ``cond``: the extra conditioning inputs (text tokens, a low-resolution image, ...), passed
# to the denoiser as keyword arguments.
DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array | None, dict], jax.Array]


# ----------------------------------------------------------------------------- core
def guide(
    cond: Float[Array, "B ..."],
    uncond: Float[Array, "B ..."],
    scale,
    rescale=0.0,
) -> Float[Array, "B ..."]:
    """Classifier-free guidance ``u + w (c - u)``, optionally rescaled (Lin et al. 2023, 3.4).

    With ``rescale = phi > 0`` the guided output ``g`` is blended with ``g * std(c) / std(g)``
    (stds per example over all but the batch axis): ``phi = 1`` gives the conditional output's
    std, which undoes the over-exposure that large scales cause; ``phi = 0`` is plain guidance.

    Args:
      cond, uncond: ``[B, ...]`` model outputs with and without the condition.
      scale: the guidance scale ``w`` (traced float).
      rescale: ``phi`` in [0, 1] (traced float).

    Returns:
      ``[B, ...]`` the guided output, float32.
    """
    c, u = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    g = u + scale * (c - u)
    axes = tuple(range(1, g.ndim))
    std_c = jnp.std(c, axis=axes, keepdims=True)
    std_g = jnp.std(g, axis=axes, keepdims=True)
    # A constant guided output has nothing to rescale (and would divide by zero).
    factor = jnp.where(std_g > 0, std_c / jnp.where(std_g > 0, std_g, 1.0), 1.0)
    return rescale * (g * factor) + (1.0 - rescale) * g


def _guided(denoise: DenoiseFn, x, mt, labels, cond, null_cond, guidance, rescale, null_label: int):
    """The model output with classifier-free guidance: one call when guidance == 1 or when
    nothing can be dropped (no labels, no ``null_cond``); else one call on the doubled batch,
    whose second half has the null label and the ``null_cond`` values (the other ``cond``
    inputs, e.g. a super-resolution stage's low-resolution image, are kept)."""
    cond, null_cond = cond or {}, null_cond or {}
    if labels is None and not null_cond:
        return denoise(x, mt, None, cond)

    def cond_only(_):
        return denoise(x, mt, labels, cond).astype(jnp.float32)

    def both(_):
        xx = jnp.concatenate([x, x])
        ll = None
        if labels is not None:
            ll = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
        cc = {
            k: jnp.concatenate(
                [v, jnp.broadcast_to(jnp.asarray(null_cond.get(k, v), v.dtype), v.shape)]
            )
            for k, v in cond.items()
        }
        out = denoise(xx, jnp.concatenate([mt, mt]), ll, cc)
        c, u = jnp.split(out, 2)
        return guide(c, u, guidance, rescale)

    return jax.lax.cond(guidance == 1.0, cond_only, both, None)


def _half_log_snr(alpha, sigma):
    """``lambda = log(alpha / sigma)``: -inf where alpha = 0 (flow at t = 1), +inf at sigma = 0."""
    return jnp.log(alpha) - jnp.log(sigma)


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
    cond=None,
    null_cond=None,
    guidance=1.0,
    guidance_rescale=0.0,
    eta=0.0,
    null_label: int = 0,
    clip: bool = True,
    max_steps: int = 1000,
) -> jax.Array:
    """Runs a sampler from ``x_T`` (noise at t = 1) to t = 0. Traceable; one ``lax.scan``.

    Args:
      denoise: ``(x, model_time [B], labels | None, cond) -> output`` in ``prediction``
        space.
      schedule: the noise schedule the model was trained with.
      prediction: ``eps`` | ``x0`` | ``v`` | ``flow``.
      sampler: one of ``SAMPLERS``.
      x_T: ``[B, ...]`` starting noise.
      key: randomness of ``ddpm`` / ``ddim`` (eta > 0).
      steps: number of steps (traced int, 1..max_steps).
      labels: ``[B]`` ints or None (unconditional model); ``null_label`` is the dropped class.
      cond: ``{name: [B, ...]}`` extra conditioning inputs, passed to ``denoise``.
      null_cond: ``{name: value}`` what guidance's unconditional half sees instead of
        ``cond[name]`` (broadcast to its shape); the inputs it does not name are kept.
      guidance, guidance_rescale, eta: traced floats (``guidance_rescale``: ``phi`` of
        :func:`guide`; ``eta``: ``ddim`` only).
      clip: clip x0 estimates to [-1, 1].
      max_steps: static scan length.

    Returns:
      Samples ``[B, ...]`` at t = 0.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sample: unknown sampler {sampler!r}; choose from {SAMPLERS}")
    steps = jnp.clip(jnp.asarray(steps, jnp.int32), 1, max_steps)
    guidance = jnp.asarray(guidance, jnp.float32)
    rescale = jnp.asarray(guidance_rescale, jnp.float32)
    eta = jnp.asarray(
        1.0 if sampler == "ddpm" else (eta if sampler == "ddim" else 0.0), jnp.float32
    )
    B = x_T.shape[0]
    flow = schedule.kind == "flow"

    def predict(x, t):
        mt = jnp.full((B,), schedule.model_time(t), jnp.float32)
        out = _guided(
            denoise, x, mt, labels, cond, null_cond, guidance, rescale, null_label
        ).astype(jnp.float32)
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

    def dpmpp_step(x, t, s_, t_prev, x0_prev, first_order):
        # DPM-Solver++(2M) in lambda = log(alpha / sigma), h = lambda_s - lambda_t:
        #   x_s = (sigma_s / sigma_t) x + alpha_s (1 - e^-h) D,
        #   D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h  (D = x0: first order = DDIM).
        # alpha_s (1 - e^-h) = alpha_s - alpha_t sigma_s / sigma_t stays finite when h = inf.
        x0, _ = predict(x, t)
        a_t, s_t, a_s, s_s = (
            schedule.alpha(t),
            schedule.sigma(t),
            schedule.alpha(s_),
            schedule.sigma(s_),
        )
        lam_t = _half_log_snr(a_t, s_t)
        h = _half_log_snr(a_s, s_s) - lam_t
        h_prev = lam_t - _half_log_snr(schedule.alpha(t_prev), schedule.sigma(t_prev))
        # inf / nan in the unused branch (first step, last step) are never selected.
        c = jnp.where(first_order, 0.0, h / (2.0 * h_prev))
        d = x0 + c * (x0 - x0_prev)
        ratio = s_s / s_t
        return ratio * x + (a_s - a_t * ratio) * d, x0

    def body(carry, i):
        def step(carry):
            x, x0_prev, t_prev = carry
            t = 1.0 - i.astype(jnp.float32) / steps
            s_ = jnp.maximum(1.0 - (i + 1).astype(jnp.float32) / steps, 0.0)
            if sampler == "heun":
                # VP: the first step leaves sigma/alpha = sigma_max (2e4 for the capped cosine);
                # a trapezoid over [sigma_1, sigma_max] overweights the end point, Euler does not.
                euler_only = (i + 1 == steps) | ((i == 0) & (not flow))
                return heun_step(x, t, s_, euler_only), x0_prev, t
            if sampler == "dpmpp_2m":
                x, x0 = dpmpp_step(x, t, s_, t_prev, x0_prev, (i == 0) | (i + 1 == steps))
                return x, x0, t
            return ddim_step(x, t, s_, jax.random.fold_in(key, i)), x0_prev, t

        return jax.lax.cond(i < steps, step, lambda c: c, carry), None

    x = x_T.astype(jnp.float32)
    # (x, the previous step's x0 estimate and time): the history of the multistep solver.
    carry = (x, jnp.zeros_like(x), jnp.float32(1.0))
    (x, _, _), _ = jax.lax.scan(body, carry, jnp.arange(max_steps))
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
    cond,
    null_cond,
    steps,
    guidance,
    guidance_rescale,
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

    def denoise(x, t, y, c):  # merged inside the scan / cond trace: NNX transforms need that
        return bind(graphdef, params, model_state)(x, t, y, **c)

    return sample_fn(
        denoise,
        schedule,
        prediction=prediction,
        sampler=sampler,
        x_T=x_T,
        key=k_sample,
        steps=steps,
        labels=labels,
        cond=cond,
        null_cond=null_cond,
        guidance=guidance,
        guidance_rescale=guidance_rescale,
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
    cond=None,
    null_cond=None,
    sampler: str = "ddim",
    steps: int = 50,
    guidance: float = 1.0,
    guidance_rescale: float = 0.0,
    eta: float = 0.0,
    clip: bool = True,
    max_steps: int = 1000,
    model_state=None,
) -> Float[Array, "B H W C"]:
    """Samples images from a denoiser given explicitly as ``(graphdef, params[, model_state])``.

    ``shape`` is ``(B, H, W, C)``; ``labels`` ``[B]`` ints for a class-conditional model
    (``num_classes`` = its null label); ``cond`` / ``null_cond``: extra conditioning inputs
    and what guidance's unconditional half sees instead (:func:`sample_fn`). Compiled once
    per (model, shape, sampler, schedule); ``steps``, ``guidance``, ``guidance_rescale``,
    ``eta``, ``key``, ``labels``, ``cond`` values and ``params`` never recompile.
    Call under ``mlgen.sharding.use(mesh, rules)`` for sharded params.
    """
    if labels is not None:
        labels = jnp.asarray(labels, jnp.int32)
    return _sample_jit(
        params,
        model_state or {},
        key,
        labels,
        None if cond is None else {k: jnp.asarray(v) for k, v in cond.items()},
        None if null_cond is None else {k: jnp.asarray(v) for k, v in null_cond.items()},
        jnp.int32(steps),
        jnp.float32(guidance),
        jnp.float32(guidance_rescale),
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
    cond=None,
    null_cond=None,
    model_state=None,
    **overrides,
):
    """:func:`sample` with the settings of a run's objective, sampler and denoiser configs
    (``model_cfg``: ``image_size``, ``in_channels``, ``num_classes``)."""
    kw = dict(
        sampler=sampler_cfg.sampler,
        steps=sampler_cfg.steps,
        guidance=sampler_cfg.guidance,
        guidance_rescale=sampler_cfg.guidance_rescale,
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
        cond=cond,
        null_cond=null_cond,
        model_state=model_state,
        **kw,
    )


def grid_labels(num_classes: int, per_class: int) -> np.ndarray:
    """``[0]*per_class + [1]*per_class + ...``: one grid row per class."""
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
