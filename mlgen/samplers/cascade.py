"""Cascaded sampling: a base diffusion model's low-resolution samples, upsampled by a
super-resolution diffusion model (Ho et al. 2021, "Cascaded Diffusion Models").

- :func:`upsample`: the super-resolution stage alone, from given low-res images (real ones,
  or a base model's): they are noise-augmented to the fixed level ``aug_level``
  (:func:`mlgen.objectives.superres.sampling_cond`), then the upsampler's sampler runs with
  them as conditioning; class labels (and their classifier-free guidance) as any
  class-conditional model's; the low-res image is kept in guidance's unconditional half.
- :func:`cascade`: base model -> upsampler. Class labels go to each class-conditional stage;
  a text-conditioned base takes its prompts as ``base_cond`` / ``base_null_cond`` (Imagen's
  recipe: text -> low-res image -> upsampler). An upsampler without classes follows any base:
  the low-res image carries what the base was asked for.

A stage is a :class:`Stage`: a model (``graphdef`` + parameters) with its objective, denoiser
and sampler configs, never a run (``mlgen sample SR_WORKDIR --base BASE_WORKDIR`` is in
``mlgen.cli``).
"""

from __future__ import annotations

import dataclasses

import jax

from mlgen.objectives.superres import sampling_cond
from mlgen.samplers.diffusion import SamplerConfig, sample_model
from mlgen.typing import Array, Float

__all__ = ["Stage", "cascade", "check_chain", "upsample"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One model of a cascade.

    Attributes:
      graphdef, params, model_state: the denoiser.
      objective: its objective config (schedule, prediction; an upsampler's
        ``SuperResObjectiveConfig`` also gives ``sample_aug``).
      model: its denoiser config (``image_size``, ``in_channels``, ``num_classes``, and for an
        upsampler ``low_res_size`` / ``low_res_channels``).
      sampling: its sampler config; ``overrides`` replace fields of it (``steps=...``).
    """

    graphdef: object
    params: object
    objective: object
    model: object
    sampling: SamplerConfig
    model_state: object = None
    overrides: dict = dataclasses.field(default_factory=dict)


def check_chain(base_model, sr_model) -> None:
    """ValueError naming the field unless the base model's samples are the upsampler's input."""
    if not sr_model.low_res_channels:
        raise ValueError("model.low_res_channels: the second stage is no upsampler (it is 0)")
    if base_model.image_size != sr_model.low_res_size:
        raise ValueError(
            f"model.low_res_size: the upsampler takes {sr_model.low_res_size}x"
            f"{sr_model.low_res_size} images but the base model makes "
            f"{base_model.image_size}x{base_model.image_size}"
        )
    if base_model.in_channels != sr_model.low_res_channels:
        raise ValueError(
            f"model.low_res_channels: the upsampler takes {sr_model.low_res_channels} channels, "
            f"the base model makes {base_model.in_channels}"
        )
    if sr_model.num_classes and not base_model.num_classes:
        raise ValueError(
            f"model.num_classes: the upsampler takes class labels ({sr_model.num_classes} "
            "classes) but the base model has none to give it; chain an upsampler without "
            "classes (model.num_classes=0)"
        )
    if sr_model.num_classes and sr_model.num_classes != base_model.num_classes:
        raise ValueError(
            f"model.num_classes: the base model has {base_model.num_classes} classes, the "
            f"upsampler {sr_model.num_classes}"
        )


def upsample(
    sr: Stage,
    low_res: Float[Array, "B h w C"],
    *,
    key: jax.Array,
    labels=None,
    aug_level: float | None = None,
) -> Float[Array, "B H W C"]:
    """High-resolution samples of the upsampler ``sr`` given low-res images in [-1, 1].

    Args:
      sr: the super-resolution stage.
      low_res: ``[B, h, w, C]`` with ``h = sr.model.low_res_size``.
      key: randomness (the augmentation noise, the sampler).
      labels: ``[B]`` ints for a class-conditional upsampler.
      aug_level: the noise-augmentation level (schedule time); None = the objective's
        ``sample_aug``.

    Returns:
      ``[B, H, W, C]`` samples at ``H = sr.model.image_size``.
    """
    m = sr.model
    want = (m.low_res_size, m.low_res_size, m.low_res_channels)
    if tuple(low_res.shape[1:]) != want:
        raise ValueError(
            f"model.low_res_size: the upsampler takes low-res images of shape {want}, "
            f"got {tuple(low_res.shape[1:])}"
        )
    level = sr.objective.sample_aug if aug_level is None else aug_level
    k_aug, k_sample = jax.random.split(key)
    cond = sampling_cond(low_res, level, k_aug, sr.objective.make_schedule())
    return sample_model(
        sr.graphdef,
        sr.params,
        sr.objective,
        m,
        sr.sampling,
        num=low_res.shape[0],
        key=k_sample,
        labels=labels,
        cond=cond,
        model_state=sr.model_state,
        **sr.overrides,
    )


def cascade(
    base: Stage,
    sr: Stage,
    *,
    num: int,
    key: jax.Array,
    labels=None,
    aug_level: float | None = None,
    base_cond: dict | None = None,
    base_null_cond: dict | None = None,
) -> tuple[Float[Array, "B H W C"], Float[Array, "B h w C"]]:
    """Base model -> upsampler: returns ``(high_res, low_res)`` samples of ``num`` examples.

    ``labels`` (``[num]`` ints, or None) go to each stage that is class-conditional;
    ``base_cond`` / ``base_null_cond`` are the base model's extra conditioning inputs and their
    null values (a text base: ``text_tokens`` / ``text_mask`` of its prompts,
    :func:`mlgen.tasks.text.prompt_cond`), as :func:`~mlgen.samplers.diffusion.sample_model`
    takes them."""
    check_chain(base.model, sr.model)
    k_base, k_sr = jax.random.split(key)
    low = sample_model(
        base.graphdef,
        base.params,
        base.objective,
        base.model,
        base.sampling,
        num=num,
        key=k_base,
        labels=labels if base.model.num_classes else None,
        cond=base_cond,
        null_cond=base_null_cond,
        model_state=base.model_state,
        **base.overrides,
    )
    sr_labels = labels if sr.model.num_classes else None
    high = upsample(sr, low, key=k_sr, labels=sr_labels, aug_level=aug_level)
    return high, low
