"""Tiny mixture-of-experts byte-level LM: ``configs/lm/tiny.py`` with an MoE layer in every block.

Every layer's MLP is 8 SwiGLU experts of width 352, 2 chosen per token (plus the router), in
place of the dense config's one MLP of width 704: the same active parameters per token, hence
the same training FLOPs per step as ``tiny.py`` (``mlgen.models.transformer``'s formula counts
active weights), with 4x the MLP parameters. Dropless dispatch; the load-balancing (0.01) and
router z (0.001) losses join the loss and are logged as ``moe_*`` metrics with the experts' load
(``moe_expert_load_max`` / ``_min``: the most / least loaded expert over the mean, 1 = balanced).

    mlgen train configs/lm/tiny_moe.py workdir=/tmp/tiny-moe
"""

import dataclasses
from pathlib import Path

from mlgen.config import Config, load


def get_config() -> Config:
    cfg = load(Path(__file__).with_name("tiny.py"))  # everything else as the dense config
    model = dataclasses.replace(
        cfg.model, moe_every=1, num_experts=8, experts_per_token=2, moe_mlp_dim=352
    )
    return dataclasses.replace(cfg, workdir="/tmp/mlgen-tiny-moe", model=model)
