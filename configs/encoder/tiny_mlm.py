"""Tiny BERT-style masked LM on the Python standard library's own sources (bytes, no download).

A bidirectional encoder (3.3M parameters: 4 layers, width 256, 4 heads, llama flavour: RMSNorm,
RoPE, SwiGLU, tied embeddings) over packed 128-byte rows; each document in a row attends to
itself only. 15% of the bytes are selected (80% -> the mask id 256, 10% -> a random byte, 10%
kept) and predicted; the vocabulary is the 256 bytes plus the mask id (257, padded to 264).

    mlgen train configs/encoder/tiny_mlm.py workdir=/tmp/tiny-mlm

Measured on the 2-core CPU shared with other jobs (load ~10): 300 steps in 19 min wall
(1.7-3.8 s/step; the LM's tiny.py, of the same size, takes ~4-5 min on an idle machine). Loss
at the masked bytes 5.15 (step 10; uniform over 264 ids is 5.58) -> eval 2.38 / 2.00 / 1.84
nats at steps 100 / 200 / 300, masked-byte accuracy 0.38 / 0.47 / 0.52. Re-running the command
resumes from the last checkpoint.
"""

from mlgen.config import Config, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.text import TextDataConfig
from mlgen.models.encoder import EncoderConfig
from mlgen.objectives.mlm import MLMObjectiveConfig


def get_config() -> Config:
    return Config(
        task="mlm",
        workdir="/tmp/mlgen-tiny-mlm",
        seed=0,
        model=EncoderConfig(vocab_size=264, num_layers=4, d_model=256, num_heads=4),
        data=TextDataConfig(
            source="stdlib", tokenizer="byte", vocab_size=256, seq_len=128, batch_size=16
        ),
        objective=MLMObjectiveConfig(),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=1e-3, warmup_steps=30, weight_decay=0.1, clip_norm=1.0),
        train=TrainConfig(
            num_steps=300, log_every=10, eval_every=100, eval_steps=8, checkpoint_every=100
        ),
    )
