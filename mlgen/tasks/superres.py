"""Super-resolution task: a denoiser conditioned on a low-resolution image, the second stage of a
cascade (``task="superres"``).

- the data (``ImageDataConfig`` with ``low_res_size``) add ``low_res`` to every batch: the
  high-resolution images averaged over blocks to that size;
- the denoiser (UNet or DiT with ``low_res_channels`` / ``low_res_size``) sees it upsampled
  and concatenated to its input, noise-augmented at a random level
  (:mod:`mlgen.objectives.superres`);
- at each eval the hook writes ``WORKDIR/samples/step_NNNNNN.png``: held-out low-res images
  upsampled by the model, as triples ``low-res (nearest) | output | real``, one class per row;
  and ``WORKDIR/loss.png``.

Sample a cascade with ``mlgen sample SR_WORKDIR --base BASE_WORKDIR --out grid.png`` and score
it with ``mlgen eval SR_WORKDIR --base BASE_WORKDIR`` (:mod:`mlgen.cli.superres`).
"""

from __future__ import annotations

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from mlgen import sharding
from mlgen.config import Config, check
from mlgen.data.images import (
    ImageDataConfig,
    batch_spec,
    check_images,
    downsample_area,
    load_arrays,
    make_image_data,
    num_classes,
    save_grid,
)
from mlgen.models.family import Family
from mlgen.nn.lowres import upsample as upsample_images
from mlgen.objectives.superres import SuperResObjectiveConfig, make_sr_loss
from mlgen.samplers.cascade import Stage, upsample
from mlgen.tasks.base import TaskSpec, policy, register
from mlgen.tasks.diffusion import loss_plot_hook
from mlgen.train.task import Task

__all__ = ["SUPERRES", "SuperResGridHook", "held_out_low_res"]


def _checks(cfg: Config, family: Family, mesh: dict[str, int] | None) -> None:
    del family, mesh
    m, d = cfg.model, cfg.data
    check(not d.vae, "data.vae", "the superres task upsamples images, not a VAE's latents")
    check(
        m.low_res_channels > 0,
        "model.low_res_channels",
        "the superres task needs a denoiser with a low-res input (low_res_channels > 0)",
    )
    for field, have, want in (
        ("model.image_size", m.image_size, d.image_size),
        ("model.in_channels", m.in_channels, d.channels),
        ("model.low_res_channels", m.low_res_channels, d.channels),
        ("model.low_res_size", m.low_res_size, d.low_res_size),
    ):
        src = {"model.in_channels": "channels", "model.low_res_channels": "channels"}.get(
            field, field.split(".")[1]
        )
        check(have == want, field, f"{have} differs from data.{src}={want}")
    if m.num_classes:
        n = num_classes(d)
        check(
            m.num_classes == n,
            "model.num_classes",
            f"{m.num_classes} but the data has {n} classes (or set 0)",
        )
    check(
        m.output_channels == m.in_channels,
        "model",
        f"the denoiser outputs {m.output_channels} channels for {m.in_channels}-channel images; "
        "the diffusion objective trains no variance (set learn_sigma=false / out_channels=0)",
    )


def _build(cfg: Config, family: Family, mesh: Mesh, rules: sharding.Rules) -> Task:
    del mesh, rules
    d, obj = cfg.data, cfg.objective
    pi, pc = jax.process_index(), jax.process_count()
    classes = cfg.model.num_classes
    pixels = cfg.model.image_size**2

    def data(split: str):
        return make_image_data(d, split=split, seed=cfg.seed, process_index=pi, process_count=pc)

    return Task(
        name=f"superres / {family.name}",
        make_model=lambda: family.build(cfg.model, nnx.Rngs(params=cfg.seed), policy(cfg)),
        trainable=family.trainable(cfg.model),
        make_loss=lambda gd: make_sr_loss(gd, obj, num_classes=classes, train=True),
        make_eval_loss=lambda gd: make_sr_loss(gd, obj, num_classes=classes, train=False),
        train_data=lambda: data("train"),
        eval_data=lambda: data("validation"),
        batch_axes=SUPERRES.batch_axes_of(family),
        hooks=(SuperResGridHook(cfg), loss_plot_hook),
        flops_per_example=(
            pixels * family.flops_per_token(cfg.model, pixels) if family.flops_per_token else 0.0
        ),
        batch_spec=lambda: batch_spec(cfg.data),
    )


def held_out_low_res(data: ImageDataConfig, per_class: int = 0, num: int = 0):
    """Held-out (validation) images, their low-res versions and labels: the first ``per_class``
    of each class (class order), or the first ``num`` (repeated cyclically to reach it), or
    (neither) all of them."""
    images, labels = load_arrays(data, "validation")
    if per_class:
        idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    else:
        idx = np.arange(num or len(labels)) % len(labels)
    images, labels = images[idx], labels[idx]
    return images, downsample_area(images, data.low_res_size), labels


class SuperResGridHook:
    """Writes ``samples/step_NNNNNN.png`` at each eval: held-out low-res images (shown
    nearest-upsampled), the model's upsampling of them, and the real images, side by side.

    Up to 4 examples per class (one class per row); drawn from a fixed key, so grids of
    successive steps compare. Runs under the trainer's mesh; process 0 writes.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._examples = None  # loaded at the first call

    def __call__(self, step: int, state: dict, graphdef: nnx.GraphDef, workdir: epath.Path) -> None:
        obj, m = self.cfg.objective, self.cfg.model
        scfg = obj.sampling
        if self._examples is None:
            k = min(scfg.per_class, 4)
            self._examples = held_out_low_res(self.cfg.data, per_class=k)
        real, low, labels = self._examples
        params = state["ema"] if (scfg.use_ema and "ema" in state) else state["params"]
        stage = Stage(graphdef, params, obj, m, scfg, state.get("model_state"))
        x = upsample(
            stage,
            jax.numpy.asarray(low),
            key=jax.random.key(self.cfg.seed + 1),
            labels=labels if m.num_classes else None,
        )
        x = np.asarray(jax.device_get(x))
        shown = np.asarray(upsample_images(jax.numpy.asarray(low), m.image_size, "nearest"))
        if jax.process_index() == 0:
            triples = np.stack([shown, x, real], axis=1).reshape(-1, *x.shape[1:])
            per_row = max(1, min(scfg.per_class, 4)) if m.num_classes else 4
            save_grid(triples, workdir / "samples" / f"step_{step:06d}.png", ncol=3 * per_row)


SUPERRES = register(
    TaskSpec(
        name="superres",
        kinds=("denoiser",),
        objective=SuperResObjectiveConfig,
        data=ImageDataConfig,
        checks=_checks,
        build=_build,
        batch_axes={
            "images": ("batch", None, None, None),
            "labels": ("batch",),
            "low_res": ("batch", None, None, None),
        },
        check_data=check_images,
    )
)
