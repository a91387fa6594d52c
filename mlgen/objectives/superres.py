"""Super-resolution diffusion: the diffusion objective on a denoiser that also sees a
low-resolution image, with noise conditioning augmentation (Ho et al. 2021; Imagen).

Each training example's low-res image ``z`` is noised by the diffusion schedule itself at an
augmentation level ``s`` drawn uniformly from ``[aug_min, aug_max]`` (schedule time, 0 = clean):
``z_s = alpha(s) z + sigma(s) eps``; the denoiser gets ``low_res = z_s`` and ``low_res_aug = s``
(embedded and added to its time embedding). At sampling the level is fixed
(``sample_aug``, ``mlgen sample --aug-level``), so that a base model's imperfect low-res
samples look like the augmented training inputs. Class labels still go through classifier-free
guidance's label dropout; the low-res image is never dropped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.config import check, register
from mlgen.objectives import schedules
from mlgen.objectives.diffusion import DiffusionObjectiveConfig, make_loss

__all__ = ["COND_KEYS", "SuperResObjectiveConfig", "augment", "make_sr_loss", "sampling_cond"]

COND_KEYS = ("low_res", "low_res_aug")


@register("superres")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SuperResObjectiveConfig(DiffusionObjectiveConfig):
    """The diffusion objective (every field of :class:`DiffusionObjectiveConfig`) plus the noise
    augmentation of the low-res conditioning image.

    Attributes:
      aug_min, aug_max: training augmentation levels are uniform in ``[aug_min, aug_max]``
        (schedule time in [0, 1]; 0 = the clean low-res image).
      sample_aug: the fixed level at sampling (sample grids, ``mlgen sample`` / ``eval``).
    """

    aug_min: float = 0.0
    aug_max: float = 0.5
    sample_aug: float = 0.1

    def validate(self) -> None:
        super().validate()
        check(
            0.0 <= self.aug_min <= self.aug_max < 1.0,
            "aug_max",
            f"need 0 <= aug_min <= aug_max < 1, got aug_min={self.aug_min}, aug_max={self.aug_max}",
        )
        check(
            0.0 <= self.sample_aug < 1.0,
            "sample_aug",
            f"must be in [0, 1), got {self.sample_aug}",
        )


def augment(low_res, level, key, schedule: schedules.Schedule):
    """``alpha(level) low_res + sigma(level) eps``: the low-res image noised to ``level``
    (``[B]`` or a scalar, schedule time) by the diffusion schedule."""
    low_res = jnp.asarray(low_res, jnp.float32)
    level = jnp.broadcast_to(jnp.asarray(level, jnp.float32), low_res.shape[:1])
    eps = jax.random.normal(key, low_res.shape, low_res.dtype)
    shape = (-1,) + (1,) * (low_res.ndim - 1)
    a = schedule.alpha(level).reshape(shape)
    s = schedule.sigma(level).reshape(shape)
    return a * low_res + s * eps


def sampling_cond(low_res, level: float, key, schedule: schedules.Schedule) -> dict:
    """The conditioning inputs at sampling: ``low_res`` noised to the fixed ``level`` and
    ``low_res_aug = level`` for every example."""
    level_b = jnp.full((low_res.shape[0],), level, jnp.float32)
    return {"low_res": augment(low_res, level_b, key, schedule), "low_res_aug": level_b}


def make_sr_loss(
    graphdef: nnx.GraphDef,
    cfg: SuperResObjectiveConfig,
    *,
    num_classes: int = 0,
    train: bool = True,
):
    """The diffusion loss (:func:`mlgen.objectives.diffusion.make_loss`) of a super-resolution
    denoiser: ``batch["low_res"]`` ``[B, h, w, C]`` is noise-augmented at a random level in
    ``[aug_min, aug_max]`` per example (train and eval alike, so the losses compare) and passed
    with the level as ``low_res`` / ``low_res_aug``."""
    inner = make_loss(graphdef, cfg, num_classes=num_classes, train=train, cond_keys=COND_KEYS)
    schedule = cfg.make_schedule()

    def loss(params, model_state, batch, rng):
        k_level, k_noise, k_rest = jax.random.split(rng, 3)
        b = batch["low_res"].shape[0]
        level = jax.random.uniform(k_level, (b,), minval=cfg.aug_min, maxval=cfg.aug_max)
        low_res = augment(batch["low_res"], level, k_noise, schedule)
        return inner(params, model_state, dict(batch, low_res=low_res, low_res_aug=level), k_rest)

    return loss
