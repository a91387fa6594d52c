"""Long context by sequence parallelism: a tiny byte-level LM on 64k-token rows over 8 devices.

Each packed row of the Python standard library's sources is 65,536 bytes long and is split
over the mesh's ``seq`` axis (data=1, seq=8; ``mesh.rules="auto"`` maps the length to ``seq``):
every device holds 8,192 tokens of activations, and attention runs as ring attention
(``model.attention.backend="auto"`` puts ``ring`` first on a mesh with seq > 1), causal with
zigzag load balancing, packed
documents kept apart by segment ids. The model is tiny (1 layer, width 32, 2 heads / 1 KV
head) because causal attention over 64k tokens is ~2*T^2*D FLOPs per layer.

    mlgen --cpu-devices 8 train configs/lm/long_context.py workdir=/tmp/long

Expected on a 2-core CPU (8 simulated devices), measured with the cores shared (load ~12):
~7 minutes in all (step 1 with compile 142 s, later steps ~115-130 s each, plus one evaluation);
training loss 5.47 -> 5.01 nats/byte over the 3 steps (uniform over 256 bytes is 5.55), eval
loss 4.97. On an idle machine expect roughly half. On real accelerators, raise the width,
depth and step count.
"""

from mlgen.config import Config, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.text import TextDataConfig
from mlgen.models.transformer import TransformerConfig
from mlgen.objectives.lm import LMObjectiveConfig


def get_config() -> Config:
    return Config(
        task="lm",
        workdir="/tmp/mlgen-long-context",
        seed=0,
        model=TransformerConfig(
            flavour="llama", vocab_size=256, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1
        ),
        data=TextDataConfig(
            source="stdlib", tokenizer="byte", vocab_size=256, seq_len=65536, batch_size=1
        ),
        objective=LMObjectiveConfig(),
        mesh=MeshConfig(data=1, seq=8),  # rules="auto": seq shards the length
        optim=OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, clip_norm=1.0),
        train=TrainConfig(num_steps=3, log_every=1, eval_every=0, eval_steps=1, checkpoint_every=4),
    )
