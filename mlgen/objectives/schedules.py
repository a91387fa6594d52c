"""Noise schedules: continuous-time ``alpha(t)``, ``sigma(t)``, log-SNR, and the discrete tables.

A diffusion path is ``x_t = alpha(t) * x0 + sigma(t) * eps`` for ``t`` in ``[0, 1]``
(``t = 0`` clean, ``t = 1`` noise). Training objectives and samplers both read the schedule
through these functions only, so they cannot disagree.

Schedules (``make(name, num_train_steps)``):

- ``linear``: DDPM betas ``linspace(1e-4, 0.02, N)`` (diffusers ``"linear"``);
- ``scaled_linear``: Stable Diffusion, ``linspace(sqrt(8.5e-4), sqrt(0.012), N) ** 2``
  (diffusers ``"scaled_linear"``);
- ``cosine``: improved DDPM, ``alpha_bar(t) = cos((t + s) / (1 + s) * pi / 2) ** 2`` with
  ``s = 0.008`` and betas capped at 0.999 (diffusers ``"squaredcos_cap_v2"``);
- ``sigmoid``: betas ``sigmoid(linspace(-6, 6, N)) * (0.02 - 1e-4) + 1e-4``
  (diffusers ``"sigmoid"``);
- ``flow``: the rectified-flow path ``alpha = 1 - t``, ``sigma = t`` (continuous only).

Discrete ("variance preserving") schedules have ``alpha^2 = alpha_bar`` and
``sigma^2 = 1 - alpha_bar``; step ``i`` of the N-step table sits at ``t = (i + 1) / N``, and
``alpha_bar(t)`` interpolates ``log alphas_cumprod`` linearly between those points (with
``alpha_bar(0) = 1``). So the continuous functions pass exactly through the table that
training uses, samplers may take any number of steps, and ``t = 1`` is the table's last entry
(for ``cosine`` the capped value 2.4e-9 rather than the closed form's 0, which keeps
``sigma / alpha`` finite). The cosine closed form is :func:`cosine_alpha_bar`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NAMES", "Schedule", "cosine_alpha_bar", "diffusers_betas", "make"]

NAMES = ("linear", "scaled_linear", "cosine", "sigmoid", "flow")
_COSINE_S = 0.008


def cosine_alpha_bar(t):
    """The improved-DDPM closed form ``cos((t + s) / (1 + s) * pi / 2) ** 2`` (s = 0.008),
    unnormalised."""
    xp = jnp if isinstance(t, jax.Array) else np
    return xp.cos((t + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2) ** 2


def diffusers_betas(
    name: str,
    num_train_steps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
) -> np.ndarray:
    """The betas of a discrete schedule exactly as diffusers defines them (float32).

    diffusers computes in float32 (``torch.linspace(..., dtype=torch.float32)``); we compute
    in float64 and round once, which agrees with it to well under 1e-6.
    """
    n = num_train_steps
    if name == "linear":
        b0, b1 = beta_start or 1e-4, beta_end or 0.02
        betas = np.linspace(b0, b1, n, dtype=np.float64)
    elif name == "scaled_linear":
        b0, b1 = beta_start or 0.00085, beta_end or 0.012
        betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float64) ** 2
    elif name == "sigmoid":
        b0, b1 = beta_start or 1e-4, beta_end or 0.02
        betas = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, n, dtype=np.float64))) * (b1 - b0) + b0
    elif name == "cosine":
        i = np.arange(n, dtype=np.float64)
        betas = np.minimum(1.0 - cosine_alpha_bar((i + 1) / n) / cosine_alpha_bar(i / n), 0.999)
    else:
        raise ValueError(f"schedules: {name!r} has no discrete betas; choose from {NAMES[:-1]}")
    return betas.astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Schedule:
    """A noise schedule. Continuous functions take ``t`` in ``[0, 1]`` (jnp or np arrays).

    Attributes:
      name: one of ``NAMES``.
      num_train_steps: N, the size of the discrete table (also the time-grid of training for
        discrete schedules: ``t = (i + 1) / N``).
      kind: ``"vp"`` (variance preserving, from betas) or ``"flow"`` (rectified flow).
      betas, alphas_cumprod: float32 ``[N]`` tables (diffusers' definitions); None for flow.
    """

    name: str
    num_train_steps: int
    kind: Literal["vp", "flow"]
    betas: np.ndarray | None
    alphas_cumprod: np.ndarray | None

    @property
    def discrete(self) -> bool:
        return self.kind == "vp"

    # ------------------------------------------------------------------ continuous time
    def alpha_bar(self, t):
        """``alpha(t) ** 2`` for VP schedules: 1 at t = 0, ``alphas_cumprod[i]`` at ``(i+1)/N``."""
        if self.kind == "flow":
            return (1.0 - t) ** 2
        # log alpha_bar on the grid t_k = k / N, k = 0..N (alpha_bar = 1 at k = 0).
        log_ab = np.concatenate([[0.0], np.log(self.alphas_cumprod.astype(np.float64))])
        xp = jnp if isinstance(t, jax.Array) else np
        return xp.exp(
            xp.interp(
                t * self.num_train_steps,
                xp.arange(self.num_train_steps + 1.0),
                xp.asarray(log_ab, dtype=xp.result_type(t, np.float32)),
            )
        )

    def alpha(self, t):
        """Signal scale ``alpha(t)``."""
        if self.kind == "flow":
            return 1.0 - t
        xp = jnp if isinstance(t, jax.Array) else np
        return xp.sqrt(self.alpha_bar(t))

    def sigma(self, t):
        """Noise scale ``sigma(t)``."""
        if self.kind == "flow":
            return t
        xp = jnp if isinstance(t, jax.Array) else np
        return xp.sqrt(1.0 - self.alpha_bar(t))

    def log_snr(self, t):
        """``log(alpha(t)^2 / sigma(t)^2)``, decreasing in t."""
        xp = jnp if isinstance(t, jax.Array) else np
        return 2.0 * (xp.log(self.alpha(t)) - xp.log(self.sigma(t)))

    def train_time(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Random training times: ``(i + 1) / N`` with ``i ~ U{0..N-1}`` (VP),
        ``U(0, 1)`` (flow)."""
        if self.kind == "flow":
            return jax.random.uniform(key, shape, jnp.float32)
        i = jax.random.randint(key, shape, 0, self.num_train_steps)
        return (i + 1).astype(jnp.float32) / self.num_train_steps

    def model_time(self, t):
        """What the denoiser sees as its time input: ``t * N`` (diffusers' timestep scale)."""
        return t * self.num_train_steps


def make(name: str, num_train_steps: int = 1000) -> Schedule:
    """The schedule ``name`` (see ``NAMES``) with an N-step table."""
    if name not in NAMES:
        raise ValueError(f"schedules: unknown schedule {name!r}; choose from {NAMES}")
    if num_train_steps < 2:
        raise ValueError(f"schedules: num_train_steps must be >= 2, got {num_train_steps}")
    if name == "flow":
        return Schedule(
            name=name, num_train_steps=num_train_steps, kind="flow", betas=None, alphas_cumprod=None
        )
    betas = diffusers_betas(name, num_train_steps)
    # diffusers: torch.cumprod(1 - betas) in float32; float64 then rounding differs by < 1e-7.
    ac = np.cumprod(1.0 - betas.astype(np.float64)).astype(np.float32)
    return Schedule(
        name=name, num_train_steps=num_train_steps, kind="vp", betas=betas, alphas_cumprod=ac
    )
