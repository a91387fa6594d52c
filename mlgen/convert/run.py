"""Run directories from Hugging Face models and back (``mlgen convert import-hf | export-hf``),
and LoRA runs folded into plain ones (``mlgen convert merge-lora``).

:func:`import_run` writes exactly what ``mlgen train`` leaves in a workdir: ``config.json``
(an ``lm`` task whose data use the model's own tokenizer, ``data.tokenizer="pretrained"``), a
step-0 checkpoint of the full train state (the imported parameters, fresh optimizer state)
and the tokenizer. ``mlgen generate WORKDIR`` samples from it, ``mlgen train WORKDIR`` trains
on from it and ``mlgen plan WORKDIR`` plans it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterable

import jax

from mlgen import config as config_lib
from mlgen import runs, sharding
from mlgen.config import Config, PrecisionConfig
from mlgen.convert import layout
from mlgen.convert.exporter import export_hf
from mlgen.convert.importer import load_params, policy_for
from mlgen.convert.layout import ConvertError
from mlgen.convert.reader import read_config
from mlgen.data.pretrained import HF_TOKENIZER, SP_TOKENIZER, SPECIALS, has_pretrained
from mlgen.data.pretrained import load_pretrained as load_tokenizer
from mlgen.data.text import TextDataConfig
from mlgen.models.transformer import TransformerConfig
from mlgen.nn.core import merge_adapters
from mlgen.objectives.lm import LMObjectiveConfig
from mlgen.train.checkpoint import Checkpointer
from mlgen.train.trainer import saved_config

_TOKENIZER_FILES = (HF_TOKENIZER, SP_TOKENIZER, "tokenizer_config.json")


def import_run(
    src: str, workdir: str, *, dtype: str | None = None, overrides: Iterable[str] = ()
) -> Config:
    """Writes the run directory ``workdir`` of the Hugging Face model in ``src``.

    Args:
      src: a model directory (``config.json``, safetensors weights, ``tokenizer.json`` or
        ``tokenizer.model``).
      workdir: the new run directory (must hold no checkpoint yet).
      dtype: the run's parameter / compute dtype (default float32).
      overrides: ``key=value`` changes to the run's config (``data.seq_len=512``, ``mesh.fsdp=8``).

    Returns:
      The run's config.
    """
    arch, model_cfg = layout.to_mlgen(read_config(src))
    if not has_pretrained(src):
        raise ConvertError(
            f"{src}: no {HF_TOKENIZER} or {SP_TOKENIZER}; a run directory needs the tokenizer"
        )
    tok = load_tokenizer(src)
    policy = policy_for(dtype)
    cfg = Config(
        task="lm",
        workdir=os.fspath(workdir),
        model=model_cfg,
        data=TextDataConfig(
            tokenizer="pretrained",
            vocab_size=model_cfg.vocab_size,
            seq_len=min(1024, model_cfg.max_len),
            add_bos=arch != layout.GPT2,
        ),
        objective=LMObjectiveConfig(),
        precision=PrecisionConfig(params=policy.params, compute=policy.compute),
    )
    cfg = config_lib.load(cfg, overrides)
    specials = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}

    def copy_tokenizer(dst: str) -> None:
        _copy_files(src, dst, _TOKENIZER_FILES)
        with open(os.path.join(dst, SPECIALS), "w") as f:
            json.dump(specials, f)

    _write_run(cfg, lambda abstract: load_params(src, arch, model_cfg, abstract), copy_tokenizer)
    return cfg


def _copy_files(src: str, dst: str, names: Iterable[str]) -> None:
    for name in names:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def _write_run(
    cfg: Config, make_params: Callable[[dict], dict], write_files: Callable[[str], None]
) -> None:
    """Writes the run directory ``cfg.workdir``: a step-0 checkpoint of the train state whose
    parameters are ``make_params(abstract params with the run's shardings)`` (fresh optimizer),
    the files of ``write_files(workdir)`` and ``config.json`` (last: a directory with a config
    is a finished run)."""
    ckpt = Checkpointer(cfg.workdir, async_save=False)
    try:
        if ckpt.latest_step() is not None:
            raise ConvertError(
                f"workdir: {cfg.workdir} already holds checkpoints; write into a new directory"
            )
        write_files(cfg.workdir)
        s = runs.setup(cfg, abstract=True)
        with sharding.use(s.mesh, s.rules):
            params = make_params(s.state["params"])
            state = jax.jit(s.train_step.init, out_shardings=s.state_shardings)(params, {})
        ckpt.save(0, state, config=cfg, force=True)
        ckpt.wait()
    finally:
        ckpt.close()
    if jax.process_index() == 0:
        config_lib.save_json(cfg, os.path.join(cfg.workdir, "config.json"))


def _tokenizer_dir(cfg: Config, workdir: str) -> str:
    """Where a run's pretrained tokenizer files are: ``data.tokenizer_path`` (a fine-tuning run
    reads its source's), else the run directory (``import-hf`` copies them there)."""
    data = cfg.data
    if getattr(data, "tokenizer", "") == "pretrained" and getattr(data, "tokenizer_path", ""):
        return data.tokenizer_path
    return workdir


def merge_lora_run(workdir: str, dst: str, *, step: int | None = None, ema: bool = True) -> Config:
    """Writes the run directory ``dst``: the LoRA run in ``workdir`` (latest or ``step``
    checkpoint; its EMA, if it has one and ``ema``) with every adapter folded into its weight
    (``W + alpha / rank * A @ B``) and ``model.lora_rank=0``, at step 0 with a fresh optimizer:
    what ``mlgen generate``, ``mlgen train`` and ``mlgen convert export-hf`` take like any run.

    Returns:
      The merged run's config.
    """
    runs.saved_steps(workdir)  # a missing or empty workdir: one line naming it
    saved = saved_config(workdir, step)
    model = saved.model
    if not getattr(model, "lora_rank", 0):
        raise ConvertError(f"model.lora_rank: the run in {workdir} has 0: no adapters to merge")
    result = runs.restore(workdir, step=step)
    state = result.state
    params = state["ema"] if ema and "ema" in state else state["params"]
    merged = merge_adapters(params, model.lora.scale)
    tokenizer = _tokenizer_dir(result.config, workdir)
    data = result.config.data
    if tokenizer != workdir:  # the merged run carries its tokenizer files itself
        data = dataclasses.replace(data, tokenizer_path="")
    cfg = dataclasses.replace(
        result.config,
        workdir=os.fspath(dst),
        model=dataclasses.replace(model, lora_rank=0),
        data=data,
        init_from="",
    )
    cfg.validate()
    _write_run(
        cfg,
        lambda abstract: jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), merged, abstract),
        lambda d: _copy_files(tokenizer, d, (*_TOKENIZER_FILES, SPECIALS)),
    )
    return cfg


def export_run(workdir: str, dst: str, *, step: int | None = None, ema: bool = True) -> None:
    """Writes a run's model (latest or ``step`` checkpoint; its EMA, if it has one and ``ema``)
    as a Hugging Face model directory ``dst``, with the run's pretrained tokenizer files (its
    ``data.tokenizer_path``'s or its own) and their special ids in ``config.json`` (a LoRA
    run's adapters are folded into the weights: ``export_hf``)."""
    runs.saved_steps(workdir)  # a missing or empty workdir: one line naming it
    saved = saved_config(workdir, step)
    if not isinstance(saved.model, TransformerConfig):
        raise ConvertError(
            f"model: {type(saved.model).__qualname__} has no Hugging Face export "
            "(mlgen exports its transformer)"
        )
    result = runs.restore(workdir, step=step)
    state = result.state
    params = state["ema"] if ema and "ema" in state else state["params"]
    tokenizer = _tokenizer_dir(result.config, workdir)
    specials = os.path.join(tokenizer, SPECIALS)
    ids = None
    if os.path.isfile(specials):
        with open(specials) as f:
            ids = json.load(f)
    export_hf(result.config.model, params, dst, special_ids=ids)
    _copy_files(tokenizer, dst, (*_TOKENIZER_FILES, SPECIALS))
