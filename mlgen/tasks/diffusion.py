"""Diffusion task: a UNet or DiT denoiser, the diffusion objective, image data, sample-grid hooks.

Trains through the one trainer and train step (``mlgen.train``) like every task; EMA comes
from ``train.ema_decay``. At each eval and at the end, the hook writes
``WORKDIR/samples/step_NNNNNN.png`` (one row per class, from the EMA parameters when kept)
and ``WORKDIR/loss.png`` (from ``WORKDIR/metrics.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from mlgen.config import Config, check
from mlgen.objectives.diffusion import DiffusionObjectiveConfig, make_loss
from mlgen.train.task import Task, check_batch


def _model_classes():
    from mlgen.models.dit import DiT, DiTConfig
    from mlgen.models.unet import UNet, UNetConfig

    return {UNetConfig: UNet, DiTConfig: DiT}


def make_model(model_cfg, seed: int) -> nnx.Module:
    """The denoiser for a ``UNetConfig`` or ``DiTConfig``."""
    return _model_classes()[type(model_cfg)](model_cfg, rngs=nnx.Rngs(params=seed))


def validate(cfg: Config, mesh: dict[str, int]) -> None:
    from mlgen.data.images import ImageDataConfig, num_classes

    check(type(cfg.model) in _model_classes(), "model", "the diffusion task needs a UNetConfig or a DiTConfig")
    check(isinstance(cfg.data, ImageDataConfig), "data", "the diffusion task needs an ImageDataConfig")
    check(isinstance(cfg.objective, DiffusionObjectiveConfig), "objective",
          "the diffusion task needs a DiffusionObjectiveConfig")
    m, d = cfg.model, cfg.data
    check(m.image_size == d.image_size, "model.image_size",
          f"{m.image_size} differs from data.image_size={d.image_size}")
    check(m.in_channels == d.channels, "model.in_channels", f"{m.in_channels} differs from data.channels={d.channels}")
    if m.num_classes:
        n = num_classes(d)
        check(m.num_classes == n, "model.num_classes", f"{m.num_classes} but the data has {n} classes (or set 0)")
    if getattr(m, "learn_sigma", False):
        check(False, "model.learn_sigma", "the diffusion objective trains no variance; set learn_sigma=false")
    check_batch(d.batch_size, cfg.optim.grad_accum_steps, mesh)
    check(mesh["seq"] == 1, "mesh.seq", "image denoisers do not use sequence parallelism; set mesh.seq=1")


def build(cfg: Config, mesh) -> Task:
    from mlgen.data.images import make_image_data

    d, obj = cfg.data, cfg.objective
    pi, pc = jax.process_index(), jax.process_count()
    classes = cfg.model.num_classes
    return Task(
        make_model=lambda: make_model(cfg.model, cfg.seed),
        make_loss=lambda gd: make_loss(gd, obj, num_classes=classes, train=True),
        make_eval_loss=lambda gd: make_loss(gd, obj, num_classes=classes, train=False),
        train_data=lambda: make_image_data(d, split="train", seed=cfg.seed, process_index=pi, process_count=pc),
        eval_data=lambda: make_image_data(d, split="validation", seed=cfg.seed, process_index=pi, process_count=pc),
        hooks=(SampleGridHook(cfg), loss_plot_hook),
    )


class SampleGridHook:
    """``hook(step, params, ema_params, graphdef, workdir)``: writes ``samples/step_NNNNNN.png``.

    Samples are drawn from a fixed key, so grids of successive steps are comparable. Runs
    under the trainer's mesh (sharded parameters are fine).
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self, step: int, params, ema_params, graphdef, workdir: str) -> None:
        import numpy as np

        from mlgen.data.images import save_grid
        from mlgen.samplers.diffusion import grid_labels, sample_model

        obj, m = self.cfg.objective, self.cfg.model
        scfg = obj.sampling
        use = ema_params if (scfg.use_ema and ema_params is not None) else params
        labels = grid_labels(m.num_classes, scfg.per_class) if m.num_classes else None
        n = len(labels) if labels is not None else 10 * scfg.per_class
        x = sample_model(graphdef, use, obj, m, scfg, num=n, key=jax.random.key(self.cfg.seed + 1), labels=labels)
        if jax.process_index() == 0:
            save_grid(np.asarray(jax.device_get(x)), Path(workdir) / "samples" / f"step_{step:06d}.png",
                      ncol=scfg.per_class)


def loss_plot_hook(step: int, params, ema_params, graphdef, workdir: str) -> None:
    """Plots ``loss`` (and ``eval_loss``) from ``WORKDIR/metrics.jsonl`` to ``WORKDIR/loss.png``."""
    del step, params, ema_params, graphdef
    if jax.process_index() == 0:
        plot_losses(workdir)


def plot_losses(workdir: str | Path) -> Path | None:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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
    out = Path(workdir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
