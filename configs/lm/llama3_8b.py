"""Llama-3-8B pretraining on a TPU v5p-128 slice (64 chips, topology ``v5p:4x4x4``).

Llama-3-8B's shapes: 32 layers, width 4096, 32 query / 8 KV heads (head dim 128), SwiGLU
14336, vocabulary 128256, RoPE theta 500000, context 8192, untied output layer. bf16 compute
with float32 master weights and optimizer state, the Pallas TPU flash-attention kernels,
128 rows x 8192 tokens = 1,048,576 tokens per step (2 rows per chip), FSDP over all 64 chips,
remat ``dots_no_batch`` (each layer keeps its projections' outputs and recomputes the rest).

Plan it on this machine (libtpu's compiler; no TPU needed), then launch it on the pod::

    mlgen plan configs/lm/llama3_8b.py --topology v5p:4x4x4
    tpu_scripts/pod.sh launch ... configs/lm/llama3_8b.py workdir=gs://BUCKET/llama3-8b \
        data.paths=gs://BUCKET/corpus/*.jsonl data.tokenizer_path=gs://BUCKET/tokenizer.model

Data: ``jsonl`` shards with a ``text`` field and a sentencepiece tokenizer of 128256 pieces
(``data.tokenizer_path``); the placeholders below must be overridden for a real run. It is not
meant to train on a CPU: a test plans it for ``v5p:4x4x4``.

"""

from mlgen.config import Config, MeshConfig, OptimConfig, PrecisionConfig, TrainConfig
from mlgen.data.text import TextDataConfig
from mlgen.models.transformer import TransformerConfig
from mlgen.objectives.lm import LMObjectiveConfig
from mlgen.ops.attention import AttentionConfig

SEQ_LEN = 8192
ROWS = 128  # global batch: 2 rows of 8192 tokens per chip on 64 chips = 1,048,576 tokens/step


def get_config() -> Config:
    return Config(
        task="lm",
        workdir="gs://BUCKET/llama3-8b",
        seed=0,
        model=TransformerConfig(
            flavour="llama",
            vocab_size=128256,
            num_layers=32,
            d_model=4096,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            mlp_dim=14336,
            rope_theta=500000.0,
            norm_eps=1e-5,
            tie_embeddings=False,
            attention=AttentionConfig(backend="pallas_tpu"),
        ),
        precision=PrecisionConfig(params="float32", compute="bfloat16", optimizer="float32"),
        remat="dots_no_batch",
        data=TextDataConfig(
            source="jsonl",
            paths=("gs://BUCKET/corpus/*.jsonl",),
            tokenizer="bpe",
            vocab_size=128256,
            tokenizer_path="gs://BUCKET/tokenizer.model",
            seq_len=SEQ_LEN,
            batch_size=ROWS,
            pack=True,
            num_workers=4,
        ),
        objective=LMObjectiveConfig(z_loss=0.0, loss_chunk=1024),
        mesh=MeshConfig(data=1, fsdp=-1),  # FSDP over every chip (rules "auto" -> fsdp)
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
