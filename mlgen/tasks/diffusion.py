"""Diffusion task: any denoiser family, the diffusion objective, image data, sample-grid hooks.

Trains through the one trainer and train step (``mlgen.train``) like every task; EMA comes
from ``train.ema_decay``. At each eval and at the end, the hooks write
``WORKDIR/samples/step_NNNNNN.png`` (one row per class, from the EMA parameters when kept)
and ``WORKDIR/loss.png`` (from ``WORKDIR/metrics.jsonl``); only process 0 writes.

Text-to-image: a denoiser with ``model.context_dim > 0`` trains on captioned digits and its
grids have one row per class prompt (:mod:`mlgen.tasks.text`).

Latent diffusion: with ``data.vae=VAE_WORKDIR`` the denoiser trains on the scaled latents of a
frozen, trained VAE and its samples are decoded to images (:mod:`mlgen.tasks.latent`).
"""

from __future__ import annotations

import io
import json

import jax
import matplotlib
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from mlgen import sharding
from mlgen.config import Config, check
from mlgen.data.images import (
    ImageDataConfig,
    check_images,
    make_image_data,
    num_classes,
    save_grid,
)
from mlgen.data.images import batch_spec as image_batch_spec
from mlgen.data.paths import write_bytes_atomic
from mlgen.models.family import Family
from mlgen.models.text import TEXT_KEYS
from mlgen.objectives.diffusion import DiffusionObjectiveConfig, make_loss
from mlgen.samplers.diffusion import grid_labels, sample_model
from mlgen.tasks import text as text_lib
from mlgen.tasks.base import TaskSpec, policy, register
from mlgen.tasks.latent import LatentData, check_latent_config
from mlgen.train.task import Task

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def _checks(cfg: Config, family: Family, mesh: dict[str, int] | None) -> None:
    del family, mesh
    m, d = cfg.model, cfg.data
    if d.vae:  # the denoiser sees the VAE's latents, not the images
        check_latent_config(cfg)
    else:
        _check_images(cfg)
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
    if text_lib.is_text(m):
        text_lib.check_text_run(cfg)
    check(
        not m.low_res_channels,
        "model.low_res_channels",
        f"{m.low_res_channels}: a super-resolution denoiser trains with task='superres'",
    )


def _check_images(cfg: Config) -> None:
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


def _build(cfg: Config, family: Family, mesh: Mesh, rules: sharding.Rules) -> Task:
    del mesh, rules
    d, obj = cfg.data, cfg.objective
    pi, pc = jax.process_index(), jax.process_count()
    classes = cfg.model.num_classes
    pixels = cfg.model.image_size**2  # what the denoiser sees (latent positions for data.vae)
    latent = LatentData(cfg) if d.vae else None  # encodes nothing until the data are asked for
    text = text_lib.is_text(cfg.model)
    cond = dict(cond_keys=TEXT_KEYS, null_cond=text_lib.null_cond(cfg.model)) if text else {}

    def data(split: str):
        if latent is not None:
            return latent.data(split, process_index=pi, process_count=pc)
        captions = text_lib.caption_map(cfg.model, split) if text else None
        return make_image_data(
            d, split=split, seed=cfg.seed, process_index=pi, process_count=pc, example_map=captions
        )

    def make_model():
        model = family.build(cfg.model, nnx.Rngs(params=cfg.seed), policy(cfg))
        return text_lib.init_text_encoder(model, cfg) if text else model

    return Task(
        name=f"diffusion / {family.name}",
        make_model=make_model,
        trainable=family.trainable(cfg.model),
        make_loss=lambda gd: make_loss(gd, obj, num_classes=classes, train=True, **cond),
        make_eval_loss=lambda gd: make_loss(gd, obj, num_classes=classes, train=False, **cond),
        train_data=lambda: data("train"),
        eval_data=lambda: data("validation"),
        batch_axes=DIFFUSION.batch_axes_of(family),
        hooks=(SampleGridHook(cfg, decode=latent.decode if latent else None), loss_plot_hook),
        flops_per_example=(
            pixels * family.flops_per_token(cfg.model, pixels) if family.flops_per_token else 0.0
        ),
        batch_spec=lambda: _batch_spec(cfg),
    )


def _batch_spec(cfg: Config) -> dict:
    """One train batch's shapes: images, or (``data.vae``) latents of the denoiser's shape."""
    spec = image_batch_spec(cfg.data)
    if cfg.data.vae:
        m = cfg.model
        spec["images"] = ((cfg.data.batch_size, m.image_size, m.image_size, m.in_channels),) + (
            spec["images"][1],
        )
    if text_lib.is_text(cfg.model):
        for k in TEXT_KEYS:
            spec[k] = ((cfg.data.batch_size, cfg.model.text.max_len), np.dtype(np.int32))
    return spec


class SampleGridHook:
    """Writes ``samples/step_NNNNNN.png`` at each eval.

    Samples are drawn from a fixed key, so grids of successive steps are comparable. Runs
    under the trainer's mesh (sharded parameters are fine) on every process; process 0 writes.
    ``decode``: samples -> images (latent diffusion's VAE decoder); None = they are images.
    """

    def __init__(self, cfg: Config, decode=None):
        self.cfg, self.decode = cfg, decode

    def __call__(self, step: int, state: dict, graphdef: nnx.GraphDef, workdir: epath.Path) -> None:
        obj, m = self.cfg.objective, self.cfg.model
        scfg = obj.sampling
        params = state["ema"] if (scfg.use_ema and "ema" in state) else state["params"]
        labels = grid_labels(m.num_classes, scfg.per_class) if m.num_classes else None
        n = len(labels) if labels is not None else 10 * scfg.per_class
        text = {}
        if text_lib.is_text(m):  # one row per class prompt
            prompts = text_lib.grid_prompts(10, scfg.per_class)
            text = text_lib.prompt_inputs(m, prompts)
        x = sample_model(
            graphdef,
            params,
            obj,
            m,
            scfg,
            num=n,
            key=jax.random.key(self.cfg.seed + 1),
            labels=labels,
            model_state=state.get("model_state"),
            **text,
        )
        x = np.asarray(jax.device_get(x))
        if self.decode is not None:
            x = self.decode(x)
        if jax.process_index() == 0:
            save_grid(
                x,
                workdir / "samples" / f"step_{step:06d}.png",
                ncol=scfg.per_class,
            )


def loss_plot_hook(step: int, state: dict, graphdef: nnx.GraphDef, workdir: epath.Path) -> None:
    """Plots ``loss`` (and ``eval_loss``) from ``WORKDIR/metrics.jsonl`` to ``WORKDIR/loss.png``."""
    del step, state, graphdef
    if jax.process_index() == 0:
        plot_losses(workdir)


def plot_losses(workdir) -> epath.Path | None:
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "eval_loss"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key, marker="." if key == "eval_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    out = epath.Path(workdir) / "loss.png"
    write_bytes_atomic(out, buf.getvalue())
    return out


DIFFUSION = register(
    TaskSpec(
        name="diffusion",
        kinds=("denoiser",),
        objective=DiffusionObjectiveConfig,
        data=ImageDataConfig,
        checks=_checks,
        build=_build,
        batch_axes={"images": ("batch", None, None, None), "labels": ("batch",)},
        check_data=check_images,
    )
)
