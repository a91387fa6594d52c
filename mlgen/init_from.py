"""Fine-tuning: a new run's parameters from another run or a Hugging Face model (``init_from``).

``Config.init_from`` names the source, a directory of one of two kinds:

- a **run directory** (``WORKDIR/checkpoints/<step>``): the latest checkpoint's raw
  ``params`` and ``model_state``. Not its EMA: the raw parameters are what its optimizer was
  updating, what resuming it would continue from, and the same whether or not it kept an EMA
  (export the EMA with ``mlgen convert export-hf`` and start from that directory to fine-tune
  the EMA weights);
- a **Hugging Face model directory** (``config.json`` + ``model.safetensors`` or its index):
  read by :mod:`mlgen.convert` straight into the run's shards (no device holds a whole stacked
  weight).

The optimizer state, the step counter (0), the EMA (a copy of the loaded parameters) and the
data iterator start fresh. Parameters the source does not hold (LoRA adapters) keep their
initialisation. ``init_from`` is used only while the workdir holds no checkpoint: once the run
has saved one, resuming ignores it.

The config's model section must be the source's, field by field, except the fields that change
neither the parameters nor what the model computes from them (:data:`FREE_FIELDS`: the
attention kernel, ``scan_layers``, ``dropout``) and the adapter fields (``lora_*``); the first
mismatch is one line (``model.d_model: init_from /runs/a has 256, the config has 128``), raised
before anything is created on disk or compiled.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from mlgen import config as config_lib
from mlgen import sharding
from mlgen.config import ConfigError, check, differences
from mlgen.convert import layout
from mlgen.convert.importer import abstract_params, load_params
from mlgen.convert.reader import INDEX, WEIGHTS, read_config
from mlgen.nn.policy import Policy
from mlgen.train.checkpoint import Checkpointer, workdir_path
from mlgen.train.trainer import Setup, saved_config

RUN, HF = "run", "hf"
# Model fields a fine-tuning run may set its own way: the kernel, the loop, the regulariser.
FREE_FIELDS = ("model.attention", "model.scan_layers", "model.dropout", "model.lora_")


def has_checkpoint(workdir: str | os.PathLike) -> bool:
    """Whether ``workdir/checkpoints`` holds a step directory (nothing is created)."""
    ckpts = epath.Path(os.fspath(workdir)) / "checkpoints"
    return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def source_kind(path: str) -> str:
    """``"run"`` or ``"hf"``: what the directory ``path`` holds (a ConfigError naming
    ``init_from`` if neither)."""
    where = epath.Path(path)
    check(where.exists(), "init_from", f"no such directory {path!r}")
    check(where.is_dir(), "init_from", f"{path!r} is a file, not a directory")
    if has_checkpoint(path):
        return RUN
    if (where / "config.json").is_file() and (
        (where / WEIGHTS).is_file() or (where / INDEX).is_file()
    ):
        return HF
    raise ConfigError(
        f"init_from: {path!r} is neither a run directory (checkpoints/<step>) nor a Hugging Face "
        f"model directory (config.json + {WEIGHTS})"
    )


def source_model(path: str, kind: str):
    """The model config of the source: the run's saved one, or the Hugging Face one."""
    if kind == RUN:
        return saved_config(path).model
    return layout.to_mlgen(read_config(path))[1]


def check_model(cfg: config_lib.Config, model) -> None:
    """A ConfigError naming the first model field (not in :data:`FREE_FIELDS`) where ``cfg``
    differs from the source's ``model``."""
    diffs = [d for d in differences(model, cfg.model, "model") if not d[0].startswith(FREE_FIELDS)]
    if diffs:
        field, theirs, ours = diffs[0]
        raise ConfigError(
            f"{field}: init_from {cfg.init_from} has {theirs!r}, the config has {ours!r}"
        )


def check_source(cfg: config_lib.Config) -> str | None:
    """The kind of ``cfg.init_from`` when the run starts from it (set, and the workdir has no
    checkpoint yet), else None; the path and the model section checked (one-line ConfigErrors
    naming ``init_from`` or the model field)."""
    if not cfg.init_from or has_checkpoint(cfg.workdir):
        return None
    check(
        os.path.abspath(cfg.init_from) != os.path.abspath(cfg.workdir),
        "init_from",
        "is the run's own workdir; start from another run",
    )
    kind = source_kind(cfg.init_from)
    check_model(cfg, source_model(cfg.init_from, kind))
    return kind


def _restore_run(path: str, target: dict) -> dict:
    """The leaves of ``target`` (``{"params": ..., "model_state": ...}``, abstract with
    shardings) read from the latest checkpoint of the run in ``path``; the rest of that state
    (optimizer moments, EMA) is not read."""
    ckpt = Checkpointer(path, async_save=False)
    try:
        step = ckpt.latest_step()
        stored = ckpt.stored_shapes(step)
        directory = ckpt.directory / str(step) / "state"
    finally:
        ckpt.close()
    flat = {
        jax.tree_util.keystr(p, simple=True, separator="/"): leaf
        for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
    }
    wanted = layout.nest({k: v for k, v in flat.items() if k in stored})
    with ocp.PyTreeCheckpointer() as reader:
        out = reader.restore(
            directory,
            args=ocp.args.PyTreeRestore(
                item=wanted,
                restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                partial_restore=True,
            ),
        )
    return out


def _restore_hf(path: str, cfg: config_lib.Config, params: dict) -> dict:
    """The parameters of ``params`` (abstract with shardings) that the Hugging Face model in
    ``path`` holds, streamed into their shards."""
    arch, model = layout.to_mlgen(read_config(path))
    policy = Policy(params=cfg.precision.params, compute=cfg.precision.compute)
    base = layout.flatten(abstract_params(model, policy, None)[1])
    flat = layout.flatten(params)
    return load_params(path, arch, model, layout.nest({k: flat[k] for k in base}))


def _overlay(base: dict, loaded: dict) -> dict:
    """``base`` with the leaves ``loaded`` holds replaced (nested dicts)."""
    out = dict(base)
    for k, v in loaded.items():
        out[k] = _overlay(base[k], v) if isinstance(v, dict) else v
    return out


def initial_state(s: Setup, kind: str) -> dict:
    """The fresh train state of ``s`` (step 0, fresh optimizer) whose parameters and model
    state come from ``s.config.init_from`` (a ``kind`` source), in ``s``'s shardings."""
    cfg = s.config
    params, model_state = s.state["params"], s.state["model_state"]
    target = sharding.abstract_like(
        {"params": params, "model_state": model_state},
        {"params": s.state_shardings["params"], "model_state": s.state_shardings["model_state"]},
    )
    with sharding.use(s.mesh, s.rules):
        if kind == RUN:
            loaded = _restore_run(cfg.init_from, target)
            params = _overlay(params, loaded.get("params", {}))
            model_state = _overlay(model_state, loaded.get("model_state", {}))
        else:
            params = _overlay(params, _restore_hf(cfg.init_from, cfg, target["params"]))
        return jax.jit(s.train_step.init, out_shardings=s.state_shardings)(params, model_state)


def describe(cfg: config_lib.Config, kind: str) -> str:
    """One line for the log: where the run's weights come from."""
    what = (
        "the latest checkpoint's parameters of the run" if kind == RUN else "the Hugging Face model"
    )
    where = workdir_path(cfg.init_from)
    return f"init_from: starting from {what} in {where} (step 0, fresh optimizer)"


__all__ = ["check_source", "describe", "initial_state"]
