"""Tiny configs and data shared by tests."""

import dataclasses

import numpy as np

from mlgen.config import Config, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.images import ImageDataConfig
from mlgen.data.text import TextDataConfig
from mlgen.models.transformer import TransformerConfig
from mlgen.models.unet import PRESETS
from mlgen.objectives.diffusion import DiffusionObjectiveConfig, SamplerConfig
from mlgen.objectives.lm import LMObjectiveConfig
from mlgen.ops.attention import AttentionConfig


def tiny_lm_config(
    workdir: str = "/tmp/mlgen-test", *, mesh: MeshConfig | None = None, **model
) -> Config:
    m = dict(
        flavour="llama",
        vocab_size=256,
        num_layers=2,
        d_model=64,
        num_heads=4,
        num_kv_heads=2,
        attention=AttentionConfig(backend="reference"),
    )
    m.update(model)
    return Config(
        task="lm",
        workdir=workdir,
        seed=0,
        model=TransformerConfig(**m),
        data=TextDataConfig(
            source="stdlib", tokenizer="byte", vocab_size=256, seq_len=32, batch_size=8, max_docs=40
        ),
        objective=LMObjectiveConfig(),
        mesh=mesh or MeshConfig(data=-1, rules="fsdp"),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(
            num_steps=8,
            log_every=2,
            eval_every=4,
            eval_steps=2,
            checkpoint_every=4,
            progress_bar=False,
            async_checkpoints=False,
        ),
    )


def random_lm_batch(
    batch: int = 8, seq: int = 32, vocab: int = 256, seed: int = 0, docs: int = 1
) -> dict:
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    seg = (
        np.sort(rng.integers(1, docs + 1, (batch, seq)), axis=1).astype(np.int32)
        if docs > 1
        else np.ones((batch, seq), np.int32)
    )
    pos = np.zeros_like(seg)
    for b in range(batch):
        for t in range(1, seq):
            pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    return {
        "inputs": tok[:, :-1],
        "targets": tok[:, 1:],
        "loss_mask": np.ones((batch, seq), np.float32),
        "segment_ids": seg,
        "positions": pos,
    }


def replace(cfg, **sections):
    return dataclasses.replace(cfg, **sections)


def tiny_digits_config(workdir: str) -> Config:
    """A class-conditional unet-tiny digits run at 8x8, 30 steps (fsdp rules)."""
    return Config(
        task="diffusion",
        workdir=workdir,
        seed=0,
        model=dataclasses.replace(PRESETS["unet-tiny"], num_classes=10),
        data=ImageDataConfig(source="digits", image_size=8, batch_size=16),
        objective=DiffusionObjectiveConfig(
            schedule="cosine",
            prediction="v",
            loss_weighting="min_snr",
            sampling=SamplerConfig(sampler="ddim", steps=4, per_class=2, max_steps=8),
        ),
        mesh=MeshConfig(data=-1, rules="fsdp"),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
        train=TrainConfig(
            num_steps=30,
            log_every=10,
            eval_every=30,
            eval_steps=1,
            checkpoint_every=30,
            progress_bar=False,
            async_checkpoints=False,
            ema_decay=0.9,
        ),
    )
