"""Diffusion objectives: eps / x0 / v prediction and flow matching, min-SNR weighting, CFG dropout.

The denoiser sees ``x_t = alpha(t) x0 + sigma(t) eps`` and the time ``schedule.model_time(t)``
and predicts one of

- ``eps``: the noise;
- ``x0``: the clean image;
- ``v``: ``alpha * eps - sigma * x0`` (Salimans & Ho);
- ``flow``: the velocity ``d x_t / dt = eps - x0`` of the rectified-flow path.

:func:`to_x0_eps` converts any of them to the pair ``(x0, eps)`` exactly (for any path
``alpha, sigma``), which is what the samplers use. ``loss_weighting="min_snr"`` weights each
example so that its loss, measured in x0 space, is weighted by ``min(SNR, gamma)``
(Hang et al. 2023): for eps that is ``min(SNR, gamma) / SNR``, for v
``min(SNR, gamma) / (SNR + 1)``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.config import check, prefixed, register
from mlgen.objectives import bind, schedules, state_after

__all__ = [
    "DiffusionObjectiveConfig",
    "PREDICTIONS",
    "SAMPLERS",
    "SamplerConfig",
    "from_x0_eps",
    "make_loss",
    "to_x0_eps",
    "x0_error_scale",
]

PREDICTIONS = ("eps", "x0", "v", "flow")
SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpmpp_2m")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    """How samples are drawn (training-time sample grids, ``mlgen sample`` defaults).

    Attributes:
      sampler: ``ddpm`` | ``ddim`` | ``euler`` | ``heun`` | ``dpmpp_2m`` (DPM-Solver++(2M)).
      steps: number of steps (a Heun step costs two model calls, except the last).
      guidance: classifier-free guidance scale (1 = conditional, 0 = unconditional).
      guidance_rescale: phi of guidance rescale (Lin et al. 2023) in [0, 1]; 0 = off.
      eta: DDIM noise (0 = deterministic).
      clip: clip x0 estimates to [-1, 1] (images).
      max_steps: the scan length (compiled once; ``steps`` may vary up to it).
      per_class: samples per class (one row per class) in a grid; unconditional: 10 rows.
      use_ema: sample from the EMA parameters when the run keeps them.
    """

    sampler: Literal["ddpm", "ddim", "euler", "heun", "dpmpp_2m"] = "ddim"
    steps: int = 50
    guidance: float = 2.0
    guidance_rescale: float = 0.0
    eta: float = 0.0
    clip: bool = True
    max_steps: int = 1000
    per_class: int = 10
    use_ema: bool = True

    def validate(self) -> None:
        check(
            self.sampler in SAMPLERS,
            "sampler",
            f"unknown sampler {self.sampler!r}; choose from {list(SAMPLERS)}",
        )
        check(
            1 <= self.steps <= self.max_steps,
            "steps",
            f"must be in [1, max_steps={self.max_steps}], got {self.steps}",
        )
        check(self.guidance >= 0, "guidance", f"must be >= 0, got {self.guidance}")
        check(
            0.0 <= self.guidance_rescale <= 1.0,
            "guidance_rescale",
            f"must be in [0, 1], got {self.guidance_rescale}",
        )
        check(0.0 <= self.eta <= 1.0, "eta", f"must be in [0, 1], got {self.eta}")
        check(self.per_class >= 1, "per_class", f"must be >= 1, got {self.per_class}")


@register("diffusion")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionObjectiveConfig:
    """What the denoiser predicts and how its loss is weighted.

    Attributes:
      schedule: a name from ``mlgen.objectives.schedules.NAMES``; ``flow`` = rectified flow.
      num_train_timesteps: size of the discrete table (and of the training time grid).
      prediction: ``eps`` | ``x0`` | ``v`` | ``flow``.
      loss_weighting: ``uniform`` | ``min_snr``.
      min_snr_gamma: gamma of min-SNR weighting.
      label_dropout: probability that a class label is replaced by the null class during
        training (classifier-free guidance); 0 = always conditional.
      sampling: how sample grids (and ``mlgen sample`` by default) draw from the model.
    """

    schedule: str = "cosine"
    num_train_timesteps: int = 1000
    prediction: Literal["eps", "x0", "v", "flow"] = "eps"
    loss_weighting: Literal["uniform", "min_snr"] = "uniform"
    min_snr_gamma: float = 5.0
    label_dropout: float = 0.1
    sampling: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)

    def validate(self) -> None:
        check(
            self.schedule in schedules.NAMES,
            "schedule",
            f"unknown schedule {self.schedule!r}; choose from {list(schedules.NAMES)}",
        )
        check(
            self.num_train_timesteps >= 2,
            "num_train_timesteps",
            f"must be >= 2, got {self.num_train_timesteps}",
        )
        check(
            self.prediction in PREDICTIONS,
            "prediction",
            f"unknown prediction {self.prediction!r}; choose from {list(PREDICTIONS)}",
        )
        check(
            self.loss_weighting in ("uniform", "min_snr"),
            "loss_weighting",
            f"must be 'uniform' or 'min_snr', got {self.loss_weighting!r}",
        )
        check(self.min_snr_gamma > 0, "min_snr_gamma", f"must be > 0, got {self.min_snr_gamma}")
        check(
            0.0 <= self.label_dropout < 1.0,
            "label_dropout",
            f"must be in [0, 1), got {self.label_dropout}",
        )
        prefixed("sampling", self.sampling.validate)
        if self.schedule == "flow":
            check(
                self.prediction != "eps",
                "prediction",
                "eps prediction cannot give x0 at t = 1 on the flow path (alpha = 0); "
                "use flow, v or x0",
            )
        else:
            check(
                self.prediction != "flow",
                "prediction",
                f"flow prediction needs schedule='flow', got schedule={self.schedule!r}",
            )

    def make_schedule(self) -> schedules.Schedule:
        return schedules.make(self.schedule, self.num_train_timesteps)


def _bcast(a, x):
    """``a`` of shape [B] broadcast against ``x`` [B, ...]."""
    a = jnp.asarray(a, x.dtype)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def to_x0_eps(pred, x_t, alpha, sigma, prediction: str):
    """Exact ``(x0, eps)`` from a prediction at ``x_t = alpha x0 + sigma eps``.

    ``alpha``, ``sigma``: scalars or ``[B]``; ``pred``, ``x_t``: ``[B, ...]``.
    """
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if prediction == "eps":
        return (x_t - s * pred) / a, pred
    if prediction == "x0":
        return pred, (x_t - a * pred) / s
    if prediction == "v":  # [a s; -s a] [x0; eps] = [x; v]
        n = a * a + s * s
        return (a * x_t - s * pred) / n, (s * x_t + a * pred) / n
    if prediction == "flow":  # u = eps - x0, x = a x0 + s eps
        n = a + s
        return (x_t - s * pred) / n, (x_t + a * pred) / n
    raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")


def from_x0_eps(x0, eps, alpha, sigma, prediction: str):
    """The target of ``prediction`` for the pair ``(x0, eps)``; inverse of :func:`to_x0_eps`."""
    a, s = _bcast(alpha, x0), _bcast(sigma, x0)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return a * eps - s * x0
    if prediction == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")


def x0_error_scale(alpha, sigma, prediction: str):
    """``c`` with ``x0_error = c * prediction_error`` at fixed ``x_t`` (for loss weighting)."""
    if prediction == "eps":
        return sigma / alpha
    if prediction == "x0":
        return jnp.ones_like(alpha)
    if prediction == "v":
        return sigma / (alpha * alpha + sigma * sigma)
    if prediction == "flow":
        return sigma / (alpha + sigma)
    raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")


def loss_weight(alpha, sigma, cfg: DiffusionObjectiveConfig):
    """Per-example weight ``[B]`` on the mean squared error in prediction space."""
    if cfg.loss_weighting == "uniform":
        return jnp.ones_like(alpha)
    snr = (alpha * alpha) / jnp.maximum(sigma * sigma, 1e-20)
    c = x0_error_scale(alpha, sigma, cfg.prediction)
    # min(snr, g) * c^2 with c^2 * snr bounded; written to stay finite when alpha -> 0.
    return jnp.where(
        snr < cfg.min_snr_gamma,
        (alpha * c) ** 2 / jnp.maximum(sigma * sigma, 1e-20),
        cfg.min_snr_gamma * c * c,
    )


def make_loss(
    graphdef: nnx.GraphDef,
    cfg: DiffusionObjectiveConfig,
    *,
    num_classes: int = 0,
    train: bool = True,
    cond_keys: tuple[str, ...] = (),
    null_cond: dict | None = None,
):
    """Returns ``loss(params, model_state, batch, rng) -> (loss, (metrics, model_state))``
    for a denoiser.

    The denoiser is called as ``model(x_t, time, labels, rng=..., **cond)`` where ``time`` is
    ``schedule.model_time(t)`` ``[B]``, ``labels`` ``[B]`` int (``num_classes`` = the null
    class) or None when ``num_classes == 0``, and ``cond`` the batch's ``cond_keys`` entries
    (extra conditioning: text tokens, a low-resolution image, ...). When training with
    ``label_dropout``, the dropped examples get the null class and, for every key of
    ``null_cond``, its value (broadcast to the example's shape): the learned-null condition of
    classifier-free guidance.

    ``batch``: ``images`` float ``[B, H, W, C]`` in [-1, 1], ``labels`` int ``[B]`` (used when
    ``num_classes > 0``). ``rng`` draws times, noise, label dropout and, when ``train``, dropout.
    Metrics: ``mse`` (unweighted, prediction space) and ``x0_mse`` (of the clipped x0 estimate).
    """
    cfg.validate()
    schedule = cfg.make_schedule()

    def loss(params, model_state, batch, rng):
        model = bind(graphdef, params, model_state)
        x0 = batch["images"].astype(jnp.float32)
        b = x0.shape[0]
        k_t, k_eps, k_drop, k_model = jax.random.split(rng, 4)
        t = schedule.train_time(k_t, (b,))
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        x_t = _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps
        labels = batch["labels"].astype(jnp.int32) if num_classes else None
        cond = {k: batch[k] for k in cond_keys}
        if train and cfg.label_dropout > 0 and (num_classes or null_cond):
            drop = jax.random.bernoulli(k_drop, cfg.label_dropout, (b,))
            if labels is not None:
                labels = jnp.where(drop, num_classes, labels)
            for k, null in (null_cond or {}).items():
                v = cond[k]
                null = jnp.broadcast_to(jnp.asarray(null, v.dtype), v.shape)
                cond[k] = jnp.where(_bcast(drop, v), null, v)
        pred = model(
            x_t, schedule.model_time(t), labels, rng=k_model if train else None, **cond
        ).astype(jnp.float32)
        target = from_x0_eps(x0, eps, alpha, sigma, cfg.prediction)
        per_example = jnp.mean(jnp.square(pred - target).reshape(b, -1), axis=1)
        weighted = jnp.mean(loss_weight(alpha, sigma, cfg) * per_example)
        x0_hat = jnp.clip(to_x0_eps(pred, x_t, alpha, sigma, cfg.prediction)[0], -1.0, 1.0)
        metrics = {"mse": jnp.mean(per_example), "x0_mse": jnp.mean(jnp.square(x0_hat - x0))}
        return weighted, (metrics, state_after(model, model_state))

    return loss
