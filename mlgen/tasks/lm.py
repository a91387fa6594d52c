"""Language-model task: a decoder family, the next-token objective, packed text data."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from mlgen import sharding
from mlgen.config import Config, check
from mlgen.data.text import TextDataConfig, check_corpus, make_lm_data
from mlgen.data.text import batch_spec as text_batch_spec
from mlgen.models.family import Family
from mlgen.objectives.lm import LMObjectiveConfig, make_loss
from mlgen.tasks.base import TaskSpec, policy, register, rules_for
from mlgen.train.task import Task

_TOKENS = ("batch", "length")


def _checks(cfg: Config, family: Family, mesh: dict[str, int] | None) -> None:
    m, d = cfg.model, cfg.data
    check(
        m.vocab_size >= d.vocab_size,
        "model.vocab_size",
        f"{m.vocab_size} is smaller than the tokenizer's data.vocab_size={d.vocab_size}",
    )
    if m.max_length is not None:
        check(
            d.seq_len <= m.max_length,
            "data.seq_len",
            f"{d.seq_len} exceeds model.max_len={m.max_length}",
        )
    if mesh is None:
        return
    length = sharding.shards_of(rules_for(cfg, family, mesh), "length", mesh)
    check(
        d.seq_len % length == 0,
        "data.seq_len",
        f"{d.seq_len} is not divisible by the {length} shards of the length axis "
        f"(mesh.seq={mesh['seq']})",
    )
    chunk = cfg.objective.loss_chunk
    if chunk:
        check(
            d.seq_len % chunk == 0,
            "objective.loss_chunk",
            f"{chunk} does not divide data.seq_len={d.seq_len}",
        )
        check(
            length == 1,
            "objective.loss_chunk",
            f"chunks the length axis, which mesh.seq={mesh['seq']} already shards; "
            "use 0 with sequence parallelism",
        )


def _build(cfg: Config, family: Family, mesh: Mesh, rules: sharding.Rules) -> Task:
    del mesh, rules
    d = cfg.data
    pi, pc = jax.process_index(), jax.process_count()
    objective = dict(z_loss=cfg.objective.z_loss, loss_chunk=cfg.objective.loss_chunk)
    return Task(
        name=f"lm / {family.name}",
        make_model=lambda: family.build(cfg.model, nnx.Rngs(params=cfg.seed), policy(cfg)),
        trainable=family.trainable(cfg.model),
        make_loss=lambda gd: make_loss(gd, train=True, **objective),
        make_eval_loss=lambda gd: make_loss(gd, train=False, **objective),
        train_data=lambda: make_lm_data(
            d, split="train", seed=cfg.seed, workdir=cfg.workdir, process_index=pi, process_count=pc
        ),
        eval_data=lambda: make_lm_data(
            d,
            split="validation",
            seed=cfg.seed,
            workdir=cfg.workdir,
            process_index=pi,
            process_count=pc,
        ),
        batch_axes=LM.batch_axes_of(family),
        tokens_per_example=d.seq_len,
        batch_spec=lambda: text_batch_spec(d),
        flops_per_example=(
            d.seq_len * family.flops_per_token(cfg.model, d.seq_len)
            if family.flops_per_token
            else 0.0
        ),
    )


LM = register(
    TaskSpec(
        name="lm",
        kinds=("decoder",),
        objective=LMObjectiveConfig,
        data=TextDataConfig,
        checks=_checks,
        build=_build,
        check_data=check_corpus,
        batch_axes={
            k: _TOKENS for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")
        },
    )
)
