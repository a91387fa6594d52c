"""``mlgen bench train``: the LM train step through mlgen's own path, on the peers' shapes.

Defaults (:data:`mlgen.bench.shapes.LM_TRAIN`) match ``shared/peers/lm_train.py`` and
``jax_minimal_lm_train.py``: GPT-2 flavour, 6 layers, width 384, 6 heads, context 256, batch
8, vocabulary 512, AdamW, float32. The step is the real one: config -> sharded init ->
``make_train_step`` -> jit with donation. MFU is the model FLOPs by formula
(``mlgen.train.throughput``) against the devices' bf16 peak (on CPU the measured float32
matmul peak of the host).
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from mlgen.bench.shapes import LM_TRAIN
from mlgen.bench.timing import time_train_step
from mlgen.config import REMATS, Config, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.text import TextDataConfig
from mlgen.models.transformer import TransformerConfig, transformer_flops_per_token
from mlgen.objectives.lm import LMObjectiveConfig
from mlgen.ops.attention import AttentionConfig
from mlgen.train.throughput import peak_flops


def measure(argv: list[str]) -> dict:
    """Runs ``mlgen bench train`` with these flags; returns what its JSON line holds."""
    ap = argparse.ArgumentParser(prog="mlgen bench train")
    LM_TRAIN.add_flags(ap)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--flavour", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--attention-backend", default="xla")
    ap.add_argument("--remat", default="none", choices=list(REMATS))
    ap.add_argument(
        "--scan-layers",
        default="true",
        choices=["true", "false"],
        help="run the layers with a scan (default) or unrolled, one call per layer",
    )
    ap.add_argument("--mlp", type=int, default=0, help="MLP width (0: the flavour's default)")
    ap.add_argument(
        "--loss-chunk",
        type=int,
        default=0,
        help="positions per output-layer + loss chunk (0 = all)",
    )
    ap.add_argument(
        "--moe",
        action="store_true",
        help="every layer an MoE layer (llama flavour): --experts experts of width --moe-mlp, "
        "--top-k per token (compare with the dense model of --mlp = top-k x --moe-mlp: the same "
        "active parameters)",
    )
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe-mlp", type=int, default=0, help="each expert's width (0: --mlp's)")
    ap.add_argument("--dispatch", default="dropless", choices=["dropless", "capacity"])
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="also trace --steps steps into DIR (jax.profiler + the optimized HLO) and print "
        "the step's op time by kind of op",
    )
    a = ap.parse_args(argv)
    moe = {}
    if a.moe:
        if a.flavour != "llama":
            ap.error("--moe: needs --flavour llama (SwiGLU experts)")
        moe = dict(
            moe_every=1,
            num_experts=a.experts,
            experts_per_token=a.top_k,
            moe_mlp_dim=a.moe_mlp,
            moe_dispatch=a.dispatch,
            moe_capacity_factor=a.capacity_factor,
        )

    cfg = Config(
        task="lm",
        workdir="/tmp/mlgen-bench-train",
        model=TransformerConfig(
            flavour=a.flavour,
            vocab_size=a.vocab,
            num_layers=a.layers,
            d_model=a.width,
            num_heads=a.heads,
            max_len=a.seq,
            attention=AttentionConfig(backend=a.attention_backend),
            norm_eps=1e-5,
            scan_layers=a.scan_layers == "true",
            mlp_dim=a.mlp,
            **moe,
        ),
        remat=a.remat,
        data=TextDataConfig(tokenizer="bpe", vocab_size=a.vocab, seq_len=a.seq, batch_size=a.batch),
        objective=LMObjectiveConfig(loss_chunk=a.loss_chunk),
        mesh=MeshConfig(data=-1, rules="dp"),
        optim=OptimConfig(
            lr=3e-4, b2=0.999, weight_decay=0.1, clip_norm=0.0, warmup_steps=0, schedule="constant"
        ),
        train=TrainConfig(num_steps=a.steps + a.warmup),
    )
    rng = np.random.default_rng(1)
    tok = rng.integers(0, a.vocab, (a.batch, a.seq + 1)).astype(np.int32)
    med, n_params = time_train_step(
        cfg,
        {"inputs": tok[:, :-1], "targets": tok[:, 1:]},
        steps=a.steps,
        warmup=a.warmup,
        profile_dir=a.profile,
    )
    flops_per_token = transformer_flops_per_token(cfg.model, a.seq)
    peak, peak_source = peak_flops(jax.devices())  # the mesh: data=-1 over every device
    tokens_per_s = a.batch * a.seq / med
    return {
        "bench": "mlgen-train",
        "flavour": a.flavour,
        "remat": a.remat,
        "scan_layers": a.scan_layers == "true",
        "tokens_per_s": tokens_per_s,
        "step_s": med,
        "params": n_params,  # all of them; MFU counts the active ones (an MoE's k experts)
        "loss_chunk": a.loss_chunk,
        "moe": {k: v for k, v in moe.items() if k != "moe_every"} or None,
        "devices": len(jax.devices()),
        "model_flops_per_token": flops_per_token,
        "mfu": tokens_per_s * flops_per_token / peak if peak else None,
        "peak_flops": peak,
        "peak_source": peak_source,
    }


def run(argv: list[str]) -> None:
    """``mlgen bench train [flags]``: one JSON line."""
    print(json.dumps(measure(argv)))
