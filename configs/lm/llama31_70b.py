"""Llama-3.1-70B-shaped pretraining on a TPU v5p-128 slice, and its decode cache at 256k tokens.

Llama-3.1-70B's shapes: 80 layers, width 8192, 64 query / 8 KV heads (head dim 128), SwiGLU
28672, vocabulary 128256, RoPE theta 500000 with Llama 3.1's frequency scaling (factor 8 from
8192 positions), untied output layer: 70.6B parameters. Everything else (bf16 compute, FSDP over
the 64 chips, flash attention, 1M tokens per step) is ``llama3_8b.py``'s.

The number this config is for: the KV cache a 256k-token context needs (bf16), against
``jamba15_large.py``'s (AI21 quotes ~80 GB vs ~9 GB)::

    mlgen plan configs/lm/llama31_70b.py --decode-context 262144 --decode-only
"""

import dataclasses
from pathlib import Path

from mlgen.config import Config, load


def get_config() -> Config:
    cfg = load(Path(__file__).parent / "llama3_8b.py")
    model = dataclasses.replace(
        cfg.model,
        num_layers=80,
        d_model=8192,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=28672,
        rope_scaling="llama3",
        rope_scaling_factor=8.0,
        rope_original_max_len=8192,
    )
    return dataclasses.replace(cfg, workdir="gs://BUCKET/llama31-70b", model=model)
