"""Jamba-1.5-Large-shaped hybrid (Mamba + attention + MoE) on a TPU v5p-128 slice, and its decode
cache at 256k tokens.

Jamba-1.5-Large's shapes (AI21, arXiv 2408.12570): 72 layers in 9 blocks of 8, each block one
attention layer (offset 4: ``pattern="mmmmammm"``) and seven Mamba layers (selective scan, state
16, conv 4, expand 2, dt rank 512, RMSNorms on dt / B / C), an MoE feed-forward every other layer
(16 SwiGLU experts of width 24576, top-2, softmax not renormalised: ``moe_every=2``), width 8192,
64 query / 8 KV heads, no positional encoding (``rope_theta=0``: the Mamba layers carry position),
vocabulary 65536: ~398B parameters, ~94B active. Mesh, precision and data are
``mixtral_8x7b.py``'s (expert=4 x fsdp=16, capacity dispatch).

The number this config is for: its decode cache at 256k tokens, against ``llama31_70b.py``'s::

    mlgen plan configs/lm/jamba15_large.py --decode-context 262144 --decode-only
"""

import dataclasses
from pathlib import Path

from mlgen.config import Config, load


def get_config() -> Config:
    cfg = load(Path(__file__).parent / "mixtral_8x7b.py")
    model = dataclasses.replace(
        cfg.model,
        vocab_size=65536,
        num_layers=72,
        d_model=8192,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=24576,
        rope_theta=0.0,
        sliding_window=0,
        pattern="mmmmammm",
        ssm="mamba",
        ssm_state=16,
        ssm_conv=4,
        ssm_expand=2,
        ssm_dt_rank=512,
        ssm_inner_norms=True,
        moe_every=2,
        num_experts=16,
        experts_per_token=2,
        moe_renormalize=False,
        norm_eps=1e-6,
    )
    return dataclasses.replace(cfg, workdir="gs://BUCKET/jamba15-large", model=model)
