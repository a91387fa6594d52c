"""VAE task: an autoencoder family, the reconstruction + beta * KL objective, image data.

Trains through the one trainer and train step (``mlgen.train``) like every task (checkpoints,
eval loss, EMA from ``train.ema_decay``, preemption). At each eval and at the end the hooks write
``WORKDIR/samples/step_NNNNNN.png`` (pairs of rows: held-out images, then their reconstructions
from the posterior means; from the EMA parameters when kept) and ``WORKDIR/loss.png``; only
process 0 writes. A trained run is the first stage of latent diffusion
(``mlgen.tasks.latent``: ``data.vae=WORKDIR``) and ``mlgen vae encode|decode`` reads it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from mlgen import sharding
from mlgen.config import Config, check
from mlgen.data.images import ImageDataConfig, check_images, load_arrays, make_image_data, save_grid
from mlgen.data.images import batch_spec as image_batch_spec
from mlgen.models.family import Family
from mlgen.objectives import bind
from mlgen.objectives.vae import VAEObjectiveConfig, make_loss
from mlgen.tasks.base import TaskSpec, policy, register
from mlgen.tasks.diffusion import loss_plot_hook
from mlgen.train.task import Task

__all__ = ["VAE_TASK", "ReconstructionGridHook"]


def _checks(cfg: Config, family: Family, mesh: dict[str, int] | None) -> None:
    del family, mesh
    m, d = cfg.model, cfg.data
    check(
        m.image_size == d.image_size,
        "model.image_size",
        f"{m.image_size} differs from data.image_size={d.image_size}",
    )
    check(
        m.in_channels == d.channels,
        "model.in_channels",
        f"{m.in_channels} differs from data.channels={d.channels}",
    )
    check(d.vae == "", "data.vae", "the vae task trains on images; data.vae is for diffusion")


def _build(cfg: Config, family: Family, mesh: Mesh, rules: sharding.Rules) -> Task:
    del mesh, rules
    d, obj = cfg.data, cfg.objective
    pi, pc = jax.process_index(), jax.process_count()
    return Task(
        name=f"vae / {family.name}",
        make_model=lambda: family.build(cfg.model, nnx.Rngs(params=cfg.seed), policy(cfg)),
        trainable=family.trainable(cfg.model),
        make_loss=lambda gd: make_loss(gd, obj, train=True),
        make_eval_loss=lambda gd: make_loss(gd, obj, train=False),
        train_data=lambda: make_image_data(
            d, split="train", seed=cfg.seed, process_index=pi, process_count=pc
        ),
        eval_data=lambda: make_image_data(
            d, split="validation", seed=cfg.seed, process_index=pi, process_count=pc
        ),
        batch_axes=VAE_TASK.batch_axes_of(family),
        hooks=(ReconstructionGridHook(cfg), loss_plot_hook),
        batch_spec=lambda: image_batch_spec(d),
    )


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _reconstruct(params, model_state, x, *, graphdef):
    model = bind(graphdef, params, model_state)
    return jnp.clip(model.decode(model.encode(x)[0]), -1.0, 1.0)


class ReconstructionGridHook:
    """Writes ``samples/step_NNNNNN.png``: ``rows`` pairs of rows of ``per_row`` held-out images
    (the first of the validation split, the same at every step) over their reconstructions."""

    def __init__(self, cfg: Config, *, rows: int = 4, per_row: int = 8):
        self.cfg, self.rows, self.per_row = cfg, rows, per_row

    def __call__(self, step: int, state: dict, graphdef: nnx.GraphDef, workdir: epath.Path) -> None:
        images = load_arrays(self.cfg.data, "validation")[0][: self.rows * self.per_row]
        k = min(self.per_row, len(images))
        images = images[: len(images) // k * k]
        params = state["ema"] if "ema" in state else state["params"]
        recon = np.asarray(
            jax.device_get(
                _reconstruct(
                    params, state.get("model_state") or {}, jnp.asarray(images), graphdef=graphdef
                )
            )
        )
        pairs = [a[i : i + k] for i in range(0, len(images), k) for a in (images, recon)]
        if jax.process_index() == 0:
            save_grid(np.concatenate(pairs), workdir / "samples" / f"step_{step:06d}.png", ncol=k)


VAE_TASK = register(
    TaskSpec(
        name="vae",
        kinds=("autoencoder",),
        objective=VAEObjectiveConfig,
        data=ImageDataConfig,
        checks=_checks,
        build=_build,
        batch_axes={"images": ("batch", None, None, None), "labels": ("batch",)},
        check_data=check_images,
    )
)
