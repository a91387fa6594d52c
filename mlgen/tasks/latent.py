"""A trained VAE, frozen, as the first stage of latent diffusion: encode / decode, the latent
scale factor, the latent datasets the diffusion task trains on.

:func:`load_vae` restores a VAE run (``mlgen train configs/vae/digits_vae.py``) from its
workdir onto the current devices and returns a :class:`FrozenVAE` with
``encode(images) -> latents`` (posterior means, or samples) and ``decode(latents) -> images``
(numpy in, numpy out, in fixed-size jitted chunks).

Latent diffusion is the diffusion task with ``data.vae=VAE_WORKDIR``
(``configs/diffusion/digits_latent.py``): the data section still describes the IMAGES (source,
``image_size``, channels: the VAE's), the model section the LATENTS the denoiser sees
(``model.image_size`` = the VAE's latent size, ``model.in_channels`` = its
``latent_channels``). When training starts, :class:`LatentData` encodes both splits once
(posterior means) and computes the scale factor ``1 / std`` of the training latents (how
Stable Diffusion's 0.18215 was found); it writes ``WORKDIR/latent.json`` = ``{"vae": path,
"vae_step": the VAE checkpoint used, "scale": ..., "latent_shape": [h, w, c]}``. Resuming,
sample grids and ``mlgen sample`` read that file, so they use the same VAE checkpoint and the
same scale even if the VAE run trained on since. The denoiser learns ``scale * latents`` (unit
std); samples are divided by the scale and decoded.

Single-process: the frozen VAE is replicated over this process's devices (a multi-host run would
need each host to encode on its own devices; not built yet).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from mlgen import sharding
from mlgen.config import Config, ConfigError, InputError, MeshConfig, check
from mlgen.data.images import array_data, load_arrays
from mlgen.data.paths import write_bytes_atomic
from mlgen.models.family import family_of
from mlgen.objectives import bind
from mlgen.objectives.vae import VAEObjectiveConfig, make_loss
from mlgen.tasks.base import policy, rules_for
from mlgen.train import trainer
from mlgen.train.task import Task

__all__ = [
    "LATENT_FILE",
    "FrozenVAE",
    "LatentData",
    "check_latent_config",
    "load_vae",
    "read_latent_record",
    "saved_vae_config",
    "scale_factor",
    "to_images",
]

LATENT_FILE = "latent.json"
_CHUNK = 256  # images per jitted encode / decode call (one compile per VAE)


# ----------------------------------------------------------------------------- the VAE run
def _vae_steps(workdir: str, field: str, error: type[ConfigError]) -> list[int]:
    path = epath.Path(workdir)
    check(workdir != "", field, "names no VAE workdir", error)
    check(path.exists(), field, f"no such directory {workdir!r} (a trained VAE's workdir)", error)
    check(path.is_dir(), field, f"{workdir!r} is a file, not a VAE run's directory", error)
    ckpts = path / "checkpoints"
    steps = (
        sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
    )
    check(bool(steps), field, f"{workdir!r} holds no checkpoint: not a trained run", error)
    return steps


def saved_vae_config(
    workdir: str,
    step: int | None = None,
    *,
    field: str = "workdir",
    error: type[ConfigError] = InputError,
) -> Config:
    """The saved config of the VAE run in ``workdir`` (its latest or ``step`` checkpoint).

    Raises:
      ``error`` naming ``field``: no such directory, no checkpoint, no checkpoint ``step``, or
      a run that is no VAE.
    """
    steps = _vae_steps(workdir, field, error)
    check(
        step is None or step in steps,
        field,
        f"{workdir!r} has no checkpoint {step}; saved: {steps}",
        error,
    )
    cfg = trainer.saved_config(workdir, step)
    check(
        isinstance(cfg.objective, VAEObjectiveConfig)
        and family_of(cfg.model).kind == "autoencoder",
        field,
        f"{workdir!r} is a {cfg.task} run of a {family_of(cfg.model).name}, not a VAE",
        error,
    )
    return dataclasses.replace(cfg, workdir=workdir)


@functools.partial(jax.jit, static_argnames=("graphdef", "sample"))
def _encode(params, model_state, x, key, *, graphdef, sample: bool):
    mean, logvar = bind(graphdef, params, model_state).encode(x)
    if not sample:
        return mean
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode(params, model_state, z, *, graphdef):
    return jnp.clip(bind(graphdef, params, model_state).decode(z), -1.0, 1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrozenVAE:
    """A trained VAE's parameters with jitted encode / decode (no gradients, no optimizer).

    Attributes:
      config: the VAE run's config (``workdir`` = where it was loaded from).
      step: the checkpoint it was loaded from.
      graphdef, params, model_state: the model (``params``: the EMA when the run kept one and
        ``use_ema``).
      mesh, rules: what its parameters are placed on (all devices, replicated).
    """

    config: Config
    step: int
    graphdef: nnx.GraphDef
    params: Any
    model_state: Any
    mesh: Mesh
    rules: sharding.Rules

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.config.model.latent_shape

    @property
    def image_shape(self) -> tuple[int, int, int]:
        m = self.config.model
        return (m.image_size, m.image_size, m.in_channels)

    def _chunks(self, fn, x: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
        x = np.asarray(x, np.float32)
        check(
            x.ndim == 4 and tuple(x.shape[1:]) == tuple(shape),
            what,
            f"expected [N, {', '.join(map(str, shape))}] for this VAE, got {list(x.shape)}",
            InputError,
        )
        size = -(-_CHUNK // self.mesh.size) * self.mesh.size
        out = []
        with sharding.use(self.mesh, self.rules):
            for i, start in enumerate(range(0, len(x), size)):
                part = x[start : start + size]
                pad = size - len(part)
                if pad:
                    part = np.concatenate([part, np.zeros((pad, *shape), np.float32)])
                out.append(np.asarray(jax.device_get(fn(i, jnp.asarray(part))))[: size - pad])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def encode(
        self, images: np.ndarray, *, sample: bool = False, key: jax.Array | None = None
    ) -> np.ndarray:
        """Latents ``[N, h, w, latent_channels]`` of images ``[N, H, W, C]`` in [-1, 1]: the
        posterior means, or (``sample``) draws from the posterior with ``key``. Unscaled."""
        key = jax.random.key(0) if key is None else key
        return self._chunks(
            lambda i, x: _encode(
                self.params,
                self.model_state,
                x,
                jax.random.fold_in(key, i),
                graphdef=self.graphdef,
                sample=sample,
            ),
            images,
            self.image_shape,
            "images",
        )

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Images ``[N, H, W, C]`` in [-1, 1] (clipped) of unscaled latents ``[N, h, w, c]``."""
        return self._chunks(
            lambda i, z: _decode(self.params, self.model_state, z, graphdef=self.graphdef),
            latents,
            self.latent_shape,
            "latents",
        )


def _restore_task(cfg: Config, family) -> Task:
    """Just enough of a VAE task to rebuild its train state's shapes (and restore into it)."""
    return Task(
        name=f"vae / {family.name}",
        make_model=lambda: family.build(cfg.model, nnx.Rngs(params=cfg.seed), policy(cfg)),
        make_loss=lambda gd: make_loss(gd, cfg.objective, train=False),
        train_data=lambda: None,
        trainable=family.trainable(cfg.model),
    )


def load_vae(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    use_ema: bool = True,
    devices: list | None = None,
    field: str = "workdir",
    error: type[ConfigError] = InputError,
) -> FrozenVAE:
    """Restores the VAE run in ``workdir`` (latest or ``step`` checkpoint) onto ``devices``
    (default: all), frozen.

    Args:
      workdir: a VAE run's workdir (``task="vae"``).
      step: the checkpoint; None = the latest readable one.
      use_ema: use the EMA of the parameters when the run kept one.
      devices: where to place it (replicated; the saved mesh is not needed).
      field, error: what a bad ``workdir`` is reported as (``data.vae`` / ``ConfigError``
        from a config, ``workdir`` / ``InputError`` from the CLI).
    """
    workdir = os.fspath(workdir)
    cfg = saved_vae_config(workdir, step, field=field, error=error)
    devices = list(jax.devices() if devices is None else devices)
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=-1))
    cfg.validate(len(devices))
    family = family_of(cfg.model)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = rules_for(cfg, family, dict(mesh.shape))
    setup = trainer.prepare(cfg, mesh, rules, _restore_task(cfg, family), abstract=True)
    result = trainer.restore_state(setup, step)
    state = result.state
    params = state["ema"] if use_ema and "ema" in state else state["params"]
    return FrozenVAE(
        config=cfg,
        step=int(jax.device_get(state["step"])),
        graphdef=result.graphdef,
        params=params,
        model_state=state.get("model_state") or {},
        mesh=mesh,
        rules=rules,
    )


def scale_factor(latents: np.ndarray) -> float:
    """``1 / std`` of ``latents`` over every element (Stable Diffusion's ``scaling_factor``)."""
    std = float(np.std(np.asarray(latents, np.float64)))
    check(std > 0, "data.vae", "the VAE's latents of the training set are constant (std 0)")
    return 1.0 / std


# ----------------------------------------------------------------------------- latent diffusion
def check_latent_config(cfg: Config) -> None:
    """Cross-section checks of a latent diffusion config (``data.vae`` set): the VAE run
    exists, the data are its images, the denoiser's shape is its latent's, sampling does not
    clip (latents are not in [-1, 1]). ConfigErrors naming the field; nothing is compiled."""
    d, m = cfg.data, cfg.model
    vae = saved_vae_config(d.vae, field="data.vae", error=ConfigError).model
    for field, want, got in (
        ("data.image_size", vae.image_size, d.image_size),
        ("data.channels", vae.in_channels, d.channels),
        ("model.image_size", vae.latent_size, m.image_size),
        ("model.in_channels", vae.latent_channels, m.in_channels),
    ):
        check(
            got == want,
            field,
            f"{got}, but the VAE in data.vae={d.vae!r} takes {vae.image_size}x{vae.image_size}x"
            f"{vae.in_channels} images to {vae.latent_size}x{vae.latent_size}x"
            f"{vae.latent_channels} latents (want {want})",
        )
    check(
        not cfg.objective.sampling.clip,
        "objective.sampling.clip",
        "latents are not images in [-1, 1]: set clip=false for latent diffusion (data.vae)",
    )


def read_latent_record(workdir: str) -> dict | None:
    """``WORKDIR/latent.json`` (None if the run has not written one)."""
    path = epath.Path(workdir) / LATENT_FILE
    return json.loads(path.read_text()) if path.exists() else None


class LatentData:
    """The latents of a latent diffusion run's images, scaled; built on first use (never for
    ``mlgen plan``), then kept.

    ``record()`` is the run's ``latent.json`` (computed and written on the first call of a new
    run); ``train_data`` / ``eval_data`` are resumable grain iterators of ``{"images": scaled
    latents, "labels"}``; ``decode`` turns scaled latents (samples) back into images.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @functools.cached_property
    def _record_and_vae(self) -> tuple[dict, FrozenVAE]:
        d, workdir = self.cfg.data, self.cfg.workdir
        saved = read_latent_record(workdir)
        if saved is not None:
            check(
                saved["vae"] == d.vae,
                "data.vae",
                f"{d.vae!r}, but this run trains on the latents of {saved['vae']!r} "
                f"({workdir}/{LATENT_FILE}); start a new workdir for another VAE",
            )
            vae = load_vae(d.vae, step=saved["vae_step"], field="data.vae", error=ConfigError)
            return saved, vae
        vae = load_vae(d.vae, field="data.vae", error=ConfigError)
        images, _ = load_arrays(d, "train")
        record = {
            "vae": d.vae,
            "vae_step": vae.step,
            "scale": scale_factor(vae.encode(images)),
            "latent_shape": list(vae.latent_shape),
        }
        if jax.process_index() == 0:
            path = epath.Path(workdir) / LATENT_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, (json.dumps(record) + "\n").encode())
        return record, vae

    def record(self) -> dict:
        return self._record_and_vae[0]

    @property
    def vae(self) -> FrozenVAE:
        return self._record_and_vae[1]

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(scale * latents [n, h, w, c], labels [n])`` of a split (posterior means), encoded
        once."""
        if split not in self._arrays:
            images, labels = load_arrays(self.cfg.data, split)
            latents = self.vae.encode(images) * self.record()["scale"]
            self._arrays[split] = (latents.astype(np.float32), labels)
        return self._arrays[split]

    def data(self, split: str, *, process_index: int = 0, process_count: int = 1):
        latents, labels = self.arrays(split)
        return array_data(
            latents,
            labels,
            batch_size=self.cfg.data.batch_size,
            split=split,
            seed=self.cfg.seed,
            process_index=process_index,
            process_count=process_count,
        )

    def decode(self, scaled: np.ndarray) -> np.ndarray:
        """Images of scaled latents (the denoiser's samples)."""
        return self.vae.decode(np.asarray(scaled, np.float32) / self.record()["scale"])


def to_images(cfg: Config, samples) -> np.ndarray:
    """A diffusion run's samples as images: decoded through its VAE (at the step and scale of
    ``WORKDIR/latent.json``) for a latent diffusion run, unchanged otherwise."""
    samples = np.asarray(jax.device_get(samples))
    if not getattr(cfg.data, "vae", ""):
        return samples
    check(
        read_latent_record(cfg.workdir) is not None,
        "workdir",
        f"{cfg.workdir!r} is a latent diffusion run without its {LATENT_FILE} (the VAE step "
        "and scale factor it trained with)",
        InputError,
    )
    return LatentData(cfg).decode(samples)
