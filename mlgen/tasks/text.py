"""Text-to-image pieces of the diffusion task: prompts, captioned data, the learned null, text init.

A denoiser with ``model.context_dim > 0`` (:mod:`mlgen.models.text`) trains on captioned images
(:mod:`mlgen.data.captions`): the batch carries ``text_tokens`` / ``text_mask``, the loss passes
them to the denoiser, and label dropout (``objective.label_dropout``) replaces them by the empty
prompt (:data:`null_cond`), which the model maps to its learned null embedding; the sampler's
unconditional half sees the same. ``model.text.init=WORKDIR`` copies a trained encoder run's
latest parameters into the owned text encoder when a run starts (``model.text.freeze`` then
keeps them fixed).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mlgen.config import Config, ConfigError, check, differences
from mlgen.data.captions import (
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    CaptionMap,
    caption,
    get_tokenizer,
    tokenize,
)
from mlgen.models.encoder import EncoderConfig
from mlgen.train.checkpoint import Checkpointer
from mlgen.train.trainer import saved_config

__all__ = [
    "caption_map",
    "check_text_run",
    "eval_prompts",
    "grid_prompts",
    "init_text_encoder",
    "is_text",
    "null_cond",
    "prompt_cond",
    "prompt_inputs",
    "prompt_lengths",
]

# Encoder fields a text.init source may differ in: they change neither parameters nor outputs.
_FREE = ("attention", "scan_layers", "dropout")


def is_text(model_cfg) -> bool:
    """Whether a denoiser config is text-conditioned (``context_dim > 0``)."""
    return getattr(model_cfg, "context_dim", 0) > 0


def _has_checkpoint(workdir: str) -> bool:
    ckpts = epath.Path(workdir) / "checkpoints"
    return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def check_text_run(cfg: Config) -> None:
    """The text run's cross-section checks (ConfigErrors naming the field)."""
    text = cfg.model.text
    check(
        cfg.data.source == "digits",
        "data.source",
        f"text conditioning captions the digits classes (source='digits'); got {cfg.data.source!r}",
    )
    check(not cfg.data.vae, "data.vae", "latent text-to-image is not supported; set data.vae=''")
    try:
        tok = get_tokenizer(text.tokenizer)
    except Exception as e:  # a missing / unreadable sentencepiece model
        raise ConfigError(f"model.text.tokenizer: cannot load {text.tokenizer!r}: {e}") from None
    check(
        tok.vocab_size <= text.encoder.vocab_size,
        "model.text.encoder.vocab_size",
        f"{text.encoder.vocab_size} is smaller than the tokenizer's {tok.vocab_size} ids",
    )
    if text.init:
        check(
            epath.Path(text.init).is_dir() and _has_checkpoint(text.init),
            "model.text.init",
            f"{text.init!r} is not a run directory with a checkpoint",
        )
        source = saved_config(text.init).model
        check(
            type(source) is EncoderConfig,
            "model.text.init",
            f"{text.init!r} trained a {type(source).__name__}, not an encoder (EncoderConfig)",
        )
        diffs = [
            d
            for d in differences(source, text.encoder, "model.text.encoder")
            if not d[0].removeprefix("model.text.encoder.").startswith(_FREE)
        ]
        if diffs:
            field, theirs, ours = diffs[0]
            raise ConfigError(
                f"{field}: text.init {text.init} has {theirs!r}, the config has {ours!r}"
            )


def null_cond(model_cfg) -> dict:
    """The empty prompt (all padding), broadcast by the loss and the sampler."""
    pad = get_tokenizer(model_cfg.text.tokenizer).pad_id
    return {"text_tokens": np.int32(pad), "text_mask": np.int32(0)}


def prompt_cond(model_cfg, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """``{"text_tokens", "text_mask"}`` ``[len(prompts), max_len]`` for the model's tokenizer."""
    text = model_cfg.text
    return tokenize(get_tokenizer(text.tokenizer), list(prompts), text.max_len)


def prompt_inputs(model_cfg, prompts: Sequence[str]) -> dict:
    """``cond`` (the prompts' tokens) and ``null_cond`` (the empty prompt) as
    :func:`mlgen.samplers.diffusion.sample_model` takes them."""
    return dict(cond=prompt_cond(model_cfg, prompts), null_cond=null_cond(model_cfg))


def caption_map(model_cfg, split: str) -> CaptionMap:
    """Captions from the train templates (train) or the held-out ones (validation)."""
    text = model_cfg.text
    templates = TRAIN_TEMPLATES if split == "train" else EVAL_TEMPLATES
    return CaptionMap(text.tokenizer, text.max_len, templates)


def grid_prompts(num_classes: int, per_class: int) -> list[str]:
    """One held-out-template prompt per class, ``per_class`` times each: a grid row per class."""
    return [caption(EVAL_TEMPLATES[0], c) for c in range(num_classes) for _ in range(per_class)]


def eval_prompts(num: int, num_classes: int = 10) -> tuple[np.ndarray, list[str]]:
    """``num`` (label, prompt) pairs for scoring: classes in turn, the held-out templates
    cycling over successive rounds of classes."""
    labels = np.arange(num, dtype=np.int32) % num_classes
    prompts = [
        caption(EVAL_TEMPLATES[(i // num_classes) % len(EVAL_TEMPLATES)], int(c))
        for i, c in enumerate(labels)
    ]
    return labels, prompts


def prompt_lengths(model_cfg, prompts: Sequence[str]) -> list[int]:
    """Each prompt's length in the model's tokens."""
    tok = get_tokenizer(model_cfg.text.tokenizer)
    return [len(tok.encode(p)) for p in prompts]


def _read_params(workdir: str) -> dict:
    """The latest checkpoint's ``params`` of the run in ``workdir`` as nested numpy arrays."""
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.latest_step()
        shapes = ckpt.stored_shapes(step)
        directory = ckpt.directory / str(step) / "state"
    finally:
        ckpt.close()
    item: dict = {}
    for key, shape in shapes.items():
        parts = key.split("/")
        if parts[0] != "params":
            continue
        node = item
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = np.zeros(shape, np.float32)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with ocp.PyTreeCheckpointer() as reader:
        out = reader.restore(
            directory,
            args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
        )
    return out["params"]


_CACHE: dict[str, dict] = {}


def init_text_encoder(model: nnx.Module, cfg: Config) -> nnx.Module:
    """``model`` with its text encoder's parameters from ``model.text.init`` (a new run only:
    once the run has a checkpoint, that is restored instead and the source is not read)."""
    text = cfg.model.text
    if not text.init or _has_checkpoint(cfg.workdir):
        return model
    if text.init not in _CACHE:
        _CACHE[text.init] = _read_params(text.init)
    loaded = _CACHE[text.init]
    _, state = nnx.split(model.text.encoder, nnx.Param)
    pure = nnx.to_pure_dict(state)
    flat_ours = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(pure)}
    flat_src = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
    missing = sorted(set(flat_ours) - set(flat_src))
    check(not missing, "model.text.init", f"the source run holds no {missing[:1]} parameter")
    merged = jax.tree_util.tree_map_with_path(
        lambda p, v: np.asarray(flat_src[jax.tree_util.keystr(p)], v.dtype), pure
    )
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(model.text.encoder, state)
    return model
