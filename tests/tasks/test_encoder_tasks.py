"""The mlm and seq2seq tasks: mlm through the one trainer, both tasks' cross-section checks,
the configs in configs/encoder/ (seq2seq training: test_seq2seq_task.py)."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

import mlgen
from mlgen import config as config_lib
from mlgen.config import Config, ConfigError, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.seq2seq import Seq2SeqDataConfig
from mlgen.data.text import TextDataConfig
from mlgen.models.encoder import EncoderConfig, EncoderDecoderConfig
from mlgen.objectives.mlm import MLMObjectiveConfig
from mlgen.objectives.seq2seq import Seq2SeqObjectiveConfig
from mlgen.ops.attention import AttentionConfig

ROOT = Path(__file__).resolve().parents[2]
_TRAIN = dict(progress_bar=False, async_checkpoints=False)
_MODEL = dict(num_layers=1, d_model=32, num_heads=4, attention=AttentionConfig(backend="xla"))


def _mlm(workdir: str, **model) -> Config:
    return Config(
        task="mlm",
        workdir=workdir,
        model=EncoderConfig(**{**_MODEL, "vocab_size": 264, **model}),
        data=TextDataConfig(vocab_size=256, seq_len=32, batch_size=8, max_docs=40),
        objective=MLMObjectiveConfig(),
        mesh=MeshConfig(data=-1, rules="fsdp"),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(
            num_steps=6, log_every=2, eval_every=6, eval_steps=1, checkpoint_every=6, **_TRAIN
        ),
    )


def _seq2seq(workdir: str, **model) -> Config:
    return Config(
        task="seq2seq",
        workdir=workdir,
        model=EncoderDecoderConfig(**{**_MODEL, "vocab_size": 12, **model}),
        data=Seq2SeqDataConfig(vocab_size=12, min_len=2, max_len=6, batch_size=16),
        objective=Seq2SeqObjectiveConfig(),
        mesh=MeshConfig(data=-1, rules="fsdp"),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(
            num_steps=30, log_every=5, eval_every=30, eval_steps=2, checkpoint_every=15, **_TRAIN
        ),
    )


def test_mlm_trains_through_the_trainer(tmp_path):
    result = mlgen.train(_mlm(str(tmp_path)), devices=jax.devices()[:1])
    m = result.final_metrics
    assert np.isfinite(m["eval_loss"]) and 0.05 < m["eval_masked_fraction"] < 0.3
    assert (tmp_path / "checkpoints" / "6").is_dir()


@pytest.mark.parametrize(
    "make,change,field",
    [
        (_mlm, dict(model=dict(vocab_size=256)), "model.vocab_size"),  # no room for the mask id
        (_mlm, dict(objective=MLMObjectiveConfig(mask_id=300)), "objective.mask_id"),
        (_mlm, dict(model=dict(flavour="bert", max_len=16)), "model.max_len"),
        (_mlm, dict(model=dict(vocab_size=200, tie_embeddings=False)), "model.vocab_size"),
        (_seq2seq, dict(model=dict(vocab_size=8)), "model.vocab_size"),
        (_seq2seq, dict(data=Seq2SeqDataConfig(min_len=3, max_len=2)), "data.max_len"),
        (_seq2seq, dict(mesh=MeshConfig(data=-1, seq=2)), "mesh.seq"),
        (_seq2seq, dict(objective=MLMObjectiveConfig()), "objective"),
    ],
)
def test_config_errors_name_the_field(make, change, field):
    cfg = make("/tmp/unused")
    if "model" in change:
        change = dict(change, model=dataclasses.replace(cfg.model, **change["model"]))
    cfg = dataclasses.replace(cfg, **change)
    with pytest.raises(ConfigError) as e:
        cfg.validate(num_devices=8)
    assert str(e.value).startswith(f"{field}:") and "\n" not in str(e.value), str(e.value)


def test_a_decoder_is_refused_by_the_encoder_tasks():
    cfg = dataclasses.replace(_mlm("/tmp/unused"), model=_seq2seq("/tmp/unused").model)
    with pytest.raises(ConfigError, match="^model: the mlm task trains encoder models"):
        cfg.validate()


@pytest.mark.parametrize("name", ["tiny_mlm.py", "tiny_reverse.py"])
def test_encoder_configs_validate(name):
    cfg = config_lib.load(ROOT / "configs" / "encoder" / name, ["workdir=/tmp/unused"])
    cfg.validate(num_devices=1)
    cfg.validate(num_devices=8)
