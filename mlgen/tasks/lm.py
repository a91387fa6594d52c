"""Language-model task: a decoder-only Transformer, next-token loss, packed text data."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from mlgen.config import Config, check
from mlgen.models.transformer import Transformer, TransformerConfig
from mlgen.objectives.lm import LMObjectiveConfig, make_loss
from mlgen.train.task import Task, check_batch

_AXES = ("batch", "length")


def validate(cfg: Config, mesh: dict[str, int]) -> None:
    from mlgen.data.text import TextDataConfig

    check(isinstance(cfg.model, TransformerConfig), "model", "the lm task needs a TransformerConfig")
    check(isinstance(cfg.data, TextDataConfig), "data", "the lm task needs a TextDataConfig")
    check(isinstance(cfg.objective, LMObjectiveConfig), "objective", "the lm task needs an LMObjectiveConfig")
    m, d = cfg.model, cfg.data
    check(m.vocab_size >= d.vocab_size, "model.vocab_size",
          f"{m.vocab_size} is smaller than the tokenizer's data.vocab_size={d.vocab_size}")
    if m.flavour == "gpt2":
        check(d.seq_len <= m.max_len, "data.seq_len", f"{d.seq_len} exceeds model.max_len={m.max_len}")
    check_batch(d.batch_size, cfg.optim.grad_accum_steps, mesh)
    check(d.seq_len % mesh["seq"] == 0, "data.seq_len", f"{d.seq_len} is not divisible by mesh.seq={mesh['seq']}")
    chunk = cfg.objective.loss_chunk
    if chunk:
        check(d.seq_len % chunk == 0, "objective.loss_chunk", f"{chunk} does not divide data.seq_len={d.seq_len}")
        check(mesh["seq"] == 1, "objective.loss_chunk",
              f"chunks the length axis, which mesh.seq={mesh['seq']} already shards; use 0 with sequence parallelism")
    if mesh["tensor"] > 1:
        check(m.num_heads % mesh["tensor"] == 0, "model.num_heads",
              f"{m.num_heads} is not divisible by mesh.tensor={mesh['tensor']}")


def build(cfg: Config, mesh) -> Task:
    from mlgen.data.text import make_lm_data

    d = cfg.data
    pi, pc = jax.process_index(), jax.process_count()
    model_cfg = cfg.model
    if mesh.shape["seq"] > 1 and model_cfg.attention_backend == "auto":  # sequence parallel: ring attention
        model_cfg = dataclasses.replace(model_cfg, attention_backend="ring")

    def make_model():
        return Transformer(model_cfg, rngs=nnx.Rngs(params=cfg.seed))

    objective = dict(z_loss=cfg.objective.z_loss, loss_chunk=cfg.objective.loss_chunk)

    return Task(
        make_model=make_model,
        make_loss=lambda gd: make_loss(gd, train=True, **objective),
        make_eval_loss=lambda gd: make_loss(gd, train=False, **objective),
        train_data=lambda: make_lm_data(d, split="train", seed=cfg.seed, workdir=cfg.workdir,
                                        process_index=pi, process_count=pc),
        eval_data=lambda: make_lm_data(d, split="validation", seed=cfg.seed, workdir=cfg.workdir,
                                       process_index=pi, process_count=pc),
        batch_axes={k: _AXES for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")},
        tokens_per_example=d.seq_len,
    )
