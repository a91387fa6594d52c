"""Tiny hybrid LM: three Mamba-2 layers and one attention layer (``pattern="mmma"``), each with
its SwiGLU MLP, on ``tiny.py``'s data and schedule (packed 128-byte rows of the stdlib's sources).

The Mamba-2 layers (expand 1: inner width 256 in 8 heads of 32, state 64, groups 1, conv 4,
chunk 64) have about the attention layers' parameter count, so the two models are ~3M
parameters each; compare their eval losses at equal wall time::

    mlgen train configs/lm/tiny_hybrid.py workdir=/tmp/tiny-hybrid
    mlgen train configs/lm/tiny.py workdir=/tmp/tiny

Measured on the shared 2-core CPU (load 6-16): eval loss 1.821 / 1.657 / 1.501 nats/byte at steps
100 / 200 / 300 (tiny.py: 2.182 / 1.959 / 1.797); per step ~2x tiny.py's time on CPU (the SSD
chunks are small batched matmuls).
"""

import dataclasses
from pathlib import Path

from mlgen.config import Config, load


def get_config() -> Config:
    cfg = load(Path(__file__).parent / "tiny.py")
    model = dataclasses.replace(
        cfg.model,
        pattern="mmma",
        ssm="mamba2",
        ssm_expand=1,
        ssm_head_dim=32,
        ssm_state=64,
        ssm_chunk=64,
    )
    return dataclasses.replace(cfg, workdir="/tmp/mlgen-tiny-hybrid", model=model)
