"""Mixtral-8x7B pretraining on a TPU v5p-128 slice (64 chips, topology ``v5p:4x4x4``), with
expert parallelism.

Mixtral-8x7B's shapes: 32 layers, each an MoE layer of 8 SwiGLU experts of width 14336, 2 chosen
per token (softmax router, top-2 renormalised, load-balancing loss weight 0.001: Hugging Face's
``router_aux_loss_coef``), width 4096, 32 query / 8 KV heads, vocabulary
32000, RoPE theta 1e6, untied output layer: 46.7B parameters, 12.9B active per token. bf16
compute, float32 master weights and optimizer state, Pallas TPU flash attention, 256 rows x 4096
tokens = 1,048,576 tokens per step, mesh ``expert=4 x fsdp=16``: each chip holds two experts of
every layer (sharded over fsdp on their width), tokens reach their experts by all-to-all over
``expert`` (capacity dispatch, factor 1.25); outside the MoE layers ``expert`` is one more
data-parallel axis. (``expert=8 x
fsdp=8`` does not map onto the 4x4x4 torus: every mesh axis must be a product of its sides.)

Plan it on this machine (libtpu's compiler; no TPU needed)::

    mlgen plan configs/lm/mixtral_8x7b.py --topology v5p:4x4x4

Data: ``jsonl`` shards with a ``text`` field and a sentencepiece tokenizer of 32000 pieces; the
placeholders below must be overridden for a real run (or start from the released weights with
``init_from=`` a ``mlgen convert import-hf`` run of ``Mixtral-8x7B-v0.1``).
"""

from mlgen.config import Config, MeshConfig, OptimConfig, PrecisionConfig, TrainConfig
from mlgen.data.text import TextDataConfig
from mlgen.models.transformer import TransformerConfig
from mlgen.objectives.lm import LMObjectiveConfig
from mlgen.ops.attention import AttentionConfig

SEQ_LEN = 4096
ROWS = 256  # 4 rows of 4096 tokens per chip on 64 chips = 1,048,576 tokens per step


def get_config() -> Config:
    return Config(
        task="lm",
        workdir="gs://BUCKET/mixtral-8x7b",
        seed=0,
        model=TransformerConfig(
            flavour="llama",
            vocab_size=32000,
            num_layers=32,
            d_model=4096,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            mlp_dim=14336,
            max_len=32768,
            rope_theta=1e6,
            norm_eps=1e-5,
            tie_embeddings=False,
            moe_every=1,
            num_experts=8,
            experts_per_token=2,
            moe_lb_weight=0.001,
            # The all-to-all layout: per-device [E, G, D] buffers of 1.25x the balanced load.
            # Planned on v5p:4x4x4: 32.5 GiB per chip, compiled FLOPs 1.63x the model's (1.25 x
            # remat), roofline MFU 61%; dropless (worst-case exchange buffers, 4x the choices at
            # expert=4): 40.7 GiB, 5.88x, 17%.
            moe_dispatch="capacity",
            moe_capacity_factor=1.25,
            moe_z_weight=0.0,
            attention=AttentionConfig(backend="pallas_tpu"),
        ),
        precision=PrecisionConfig(params="float32", compute="bfloat16", optimizer="float32"),
        remat="full",
        data=TextDataConfig(
            source="jsonl",
            paths=("gs://BUCKET/corpus/*.jsonl",),
            tokenizer="bpe",
            vocab_size=32000,
            tokenizer_path="gs://BUCKET/tokenizer.model",
            seq_len=SEQ_LEN,
            batch_size=ROWS,
            pack=True,
            num_workers=4,
        ),
        objective=LMObjectiveConfig(z_loss=0.0, loss_chunk=1024),
        mesh=MeshConfig(data=1, fsdp=-1, expert=4),
        optim=OptimConfig(lr=3e-4, b2=0.95, weight_decay=0.1, clip_norm=1.0, warmup_steps=2000),
        train=TrainConfig(
            num_steps=100_000,
            log_every=10,
            eval_every=0,
            checkpoint_every=500,
            keep_checkpoints=3,
            progress_bar=False,
        ),
    )
