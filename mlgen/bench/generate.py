"""``mlgen bench generate``: KV-cache sampling through ``mlgen.samplers.lm.generate``.

Defaults (:data:`mlgen.bench.shapes.LM_GENERATE`) match ``shared/peers/lm_generate.py``
(transformers' ``generate``): GPT-2 flavour, 6 layers, width 384, 6 heads, vocabulary 512,
batch 8, prompt 32, 224 new tokens, sampling with temperature 1 and top-k 50, no early stop.
Timed end to end (host prompts in, host tokens out), median of ``--repeats`` after one
warm-up call that compiles.

Side by side on the 2-core CPU (2026-11-24, two alternations): transformers 552 and 618 new
tokens/s, mlgen 1081 and 1146 (1.85-1.96x). The KV cache's ``[B, K, S, H]`` layout took
mlgen from 738-827 to 1230-1279 tokens/s (A/B in the same minutes; llama flavour 805 ->
1250): the ``[B, S, K, H]`` cache was transposed whole for every head's attention, per
layer per token.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from flax import nnx

from mlgen import sharding
from mlgen.bench.shapes import LM_GENERATE
from mlgen.bench.timing import median_time
from mlgen.config import MeshConfig
from mlgen.models.transformer import Transformer, TransformerConfig
from mlgen.nn.policy import Policy
from mlgen.ops.attention import AttentionConfig
from mlgen.samplers.lm import Sampling, generate


def measure(argv: list[str]) -> dict:
    """Runs ``mlgen bench generate`` with these flags; returns what its JSON line holds."""
    ap = argparse.ArgumentParser(prog="mlgen bench generate")
    LM_GENERATE.add_flags(ap)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flavour", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--attention-backend", default="xla")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args(argv)

    cfg = TransformerConfig(
        flavour=a.flavour,
        vocab_size=a.vocab,
        num_layers=a.layers,
        d_model=a.width,
        num_heads=a.heads,
        max_len=a.prompt + a.new,
        attention=AttentionConfig(backend=a.attention_backend),
    )
    policy = Policy(compute=a.dtype)  # parameters stay float32, as a trained run's
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, a.vocab, (a.batch, a.prompt)).tolist()
    sampling = Sampling(temperature=a.temperature, top_k=a.top_k)
    with sharding.use(mesh, "dp"):
        graphdef, params, _ = sharding.sharded_init(
            lambda: Transformer(cfg, policy=policy, rngs=nnx.Rngs(params=0)), mesh
        )
        calls = iter(range(1 << 30))

        def one():
            g = generate(
                (graphdef, params),
                prompts,
                max_new_tokens=a.new,
                sampling=sampling,
                seed=next(calls),
                prompt_bucket=None,
            )
            assert g.tokens.shape == (a.batch, a.new) and int(g.lengths.min()) == a.new

        med = median_time(one, steps=a.repeats, warmup=1)
    return {
        "bench": "mlgen-generate",
        "new_tokens_per_s": a.batch * a.new / med,
        "s": med,
        "flavour": a.flavour,
        "devices": len(jax.devices()),
    }


def run(argv: list[str]) -> None:
    """``mlgen bench generate [flags]``: one JSON line."""
    print(json.dumps(measure(argv)))
