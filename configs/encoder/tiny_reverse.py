"""Tiny T5-style encoder-decoder learning to reverse random strings (generated in-process).

2 encoder + 2 decoder layers (llama flavour: RMSNorm, RoPE, SwiGLU), width 64, 4 heads, tied
embeddings (0.25M parameters); strings of 2-12 symbols over 13 symbols (+ pad / bos / eos); the
target is the string backwards, then eos. No files, no download.

    mlgen train configs/encoder/tiny_reverse.py workdir=/tmp/tiny-reverse

Measured on the 2-core CPU shared with other jobs (load ~10): 600 steps in 3.5 min wall
(0.27 s/step; ~0.08 s/step when less loaded). Held-out teacher-forced token accuracy 0.914 /
0.996 / 0.999 and exact rows 0.57 / 0.97 / 0.99 at steps 200 / 400 / 600 (eval loss 0.0032);
greedy decoding (``mlgen.samplers.seq2seq.generate``) reverses 99.2% of 256 held-out strings
exactly (token accuracy 0.9992). Re-running the command resumes from the last checkpoint.
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
