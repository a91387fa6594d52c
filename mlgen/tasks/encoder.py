"""Encoder tasks: masked language modelling (``mlm``) and sequence-to-sequence (``seq2seq``).

- ``mlm``: an ``encoder`` family (``mlgen.models.encoder.Encoder``), BERT's masking objective
  (``mlgen.objectives.mlm``), the LM's packed text (``mlgen.data.text``: the standard library
  by default); packed documents attend to themselves only (segment ids).
- ``seq2seq``: a ``seq2seq`` family (``mlgen.models.encoder.EncoderDecoder``), the target cross
  entropy (``mlgen.objectives.seq2seq``), synthetic copy / reverse pairs generated in-process
  (``mlgen.data.seq2seq``).

Both train through the one trainer and train step (``mlgen.train``) with its evals and
checkpoints.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from mlgen import sharding
from mlgen.config import Config, check
from mlgen.data.seq2seq import Seq2SeqDataConfig, make_pair_data
from mlgen.data.seq2seq import batch_spec as pair_batch_spec
from mlgen.data.text import TextDataConfig, check_corpus, make_lm_data
from mlgen.data.text import batch_spec as text_batch_spec
from mlgen.models.encoder import seq2seq_flops_per_example
from mlgen.models.family import Family
from mlgen.objectives import mlm, seq2seq
from mlgen.objectives.mlm import MLMObjectiveConfig
from mlgen.objectives.seq2seq import Seq2SeqObjectiveConfig
from mlgen.tasks.base import TaskSpec, policy, register, rules_for
from mlgen.train.task import Task

_TOKENS = ("batch", "length")


def _check_lengths(cfg: Config, family: Family, mesh: dict[str, int] | None, seq_len: int):
    m = cfg.model
    if m.max_length is not None:
        check(
            seq_len <= m.max_length,
            "model.max_len",
            f"{m.max_length} is shorter than the data's {seq_len}-token rows",
        )
    if mesh is None:
        return 1
    return sharding.shards_of(rules_for(cfg, family, mesh), "length", mesh)


# ----------------------------------------------------------------------------- mlm
def _mlm_checks(cfg: Config, family: Family, mesh: dict[str, int] | None) -> None:
    m, d, obj = cfg.model, cfg.data, cfg.objective
    check(
        m.vocab_size >= d.vocab_size,
        "model.vocab_size",
        f"{m.vocab_size} is smaller than the tokenizer's data.vocab_size={d.vocab_size}",
    )
    mask_id = obj.resolved_mask_id(d.vocab_size)
    check(
        mask_id < m.vocab_size,
        "objective.mask_id" if obj.mask_id >= 0 else "model.vocab_size",
        f"the mask token {mask_id} is outside the model's {m.vocab_size} ids"
        + (
            f" (mask_id=-1 takes data.vocab_size: set model.vocab_size >= {mask_id + 1})"
            if obj.mask_id < 0
            else ""
        ),
    )
    length = _check_lengths(cfg, family, mesh, d.seq_len)
    check(
        d.seq_len % length == 0,
        "data.seq_len",
        f"{d.seq_len} is not divisible by the {length} shards of the length axis",
    )


def _mlm_build(cfg: Config, family: Family, mesh: Mesh, rules: sharding.Rules) -> Task:
    del mesh, rules
    d, obj = cfg.data, cfg.objective
    pi, pc = jax.process_index(), jax.process_count()
    kw = dict(mask_id=obj.resolved_mask_id(d.vocab_size), random_vocab=d.vocab_size)

    def data(split):
        return make_lm_data(
            d, split=split, seed=cfg.seed, workdir=cfg.workdir, process_index=pi, process_count=pc
        )

    return Task(
        name=f"mlm / {family.name}",
        make_model=lambda: family.build(cfg.model, nnx.Rngs(params=cfg.seed), policy(cfg)),
        trainable=family.trainable(cfg.model),
        make_loss=lambda gd: mlm.make_loss(gd, obj, train=True, **kw),
        make_eval_loss=lambda gd: mlm.make_loss(gd, obj, train=False, **kw),
        train_data=lambda: data("train"),
        eval_data=lambda: data("validation"),
        batch_axes=MLM.batch_axes_of(family),
        tokens_per_example=d.seq_len,
        batch_spec=lambda: text_batch_spec(d),
        flops_per_example=(
            d.seq_len * family.flops_per_token(cfg.model, d.seq_len)
            if family.flops_per_token
            else 0.0
        ),
    )


MLM = register(
    TaskSpec(
        name="mlm",
        kinds=("encoder",),
        objective=MLMObjectiveConfig,
        data=TextDataConfig,
        checks=_mlm_checks,
        build=_mlm_build,
        check_data=check_corpus,
        batch_axes={k: _TOKENS for k in ("inputs", "targets", "loss_mask")},
    )
)


# ----------------------------------------------------------------------------- seq2seq
def _seq2seq_checks(cfg: Config, family: Family, mesh: dict[str, int] | None) -> None:
    m, d = cfg.model, cfg.data
    check(
        m.vocab_size >= d.vocab_size,
        "model.vocab_size",
        f"{m.vocab_size} is smaller than the data's data.vocab_size={d.vocab_size}",
    )
    length = _check_lengths(cfg, family, mesh, d.seq_len)
    check(
        length == 1,
        "mesh.seq",
        f"the encoder-decoder does not shard the length axis ({length} shards): cross-attention "
        "has no sequence-parallel backend; use mesh.seq=1",
    )


def _seq2seq_build(cfg: Config, family: Family, mesh: Mesh, rules: sharding.Rules) -> Task:
    del mesh, rules
    d, obj = cfg.data, cfg.objective
    pi, pc = jax.process_index(), jax.process_count()

    def data(split):
        return make_pair_data(d, split=split, seed=cfg.seed, process_index=pi, process_count=pc)

    return Task(
        name=f"seq2seq / {family.name}",
        make_model=lambda: family.build(cfg.model, nnx.Rngs(params=cfg.seed), policy(cfg)),
        trainable=family.trainable(cfg.model),
        make_loss=lambda gd: seq2seq.make_loss(gd, z_loss=obj.z_loss, train=True),
        make_eval_loss=lambda gd: seq2seq.make_loss(gd, z_loss=obj.z_loss, train=False),
        train_data=lambda: data("train"),
        eval_data=lambda: data("validation"),
        batch_axes=SEQ2SEQ.batch_axes_of(family),
        tokens_per_example=d.seq_len,
        batch_spec=lambda: pair_batch_spec(d),
        flops_per_example=seq2seq_flops_per_example(cfg.model, d.seq_len, d.seq_len),
    )


SEQ2SEQ = register(
    TaskSpec(
        name="seq2seq",
        kinds=("seq2seq",),
        objective=Seq2SeqObjectiveConfig,
        data=Seq2SeqDataConfig,
        checks=_seq2seq_checks,
        build=_seq2seq_build,
        batch_axes={k: _TOKENS for k in ("targets", "loss_mask")},
    )
)
