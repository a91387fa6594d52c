"""``mlgen bench long``: how training and decoding cost grow with the context, attention against
state-space layers.

Three ~3M-parameter byte-level models of the same width and depth: the tiny transformer
(``configs/lm/tiny.py``, four attention layers), the tiny hybrid (``configs/lm/tiny_hybrid.py``,
``mmma``) and a pure Mamba-2 LM (the hybrid's SSM layers everywhere, ``pattern="m"``). For each
``--lengths`` T (one row of T tokens) it compiles the real train step (``runs.setup`` +
``make_train_step``, as ``mlgen train``), reads its temporary memory from the compiler and times
it; for each ``--contexts`` C it times one-token decode steps against a cache holding C tokens.
Attention runs on the ``blockwise`` backend (memory linear in T, as flash attention on a chip),
so the quadratic term is compute, not an ``[T, T]`` buffer. Models and lengths are run in turns
(one timed call each per round), so load from other processes falls on all alike.

Each JSON line is one (model, length) or (model, context); the last line per model fits the
growth exponent ``d log(time) / d log(T)`` between the shortest and the longest length (1:
linear, 2: quadratic).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlgen import runs, sharding
from mlgen.config import load
from mlgen.nn.attention import KVCache
from mlgen.ops.attention import AttentionConfig
from mlgen.train.step import make_train_step

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "lm"
MODELS = ("transformer", "hybrid", "mamba2")


def model_config(name: str, length: int):
    """The run config of one of :data:`MODELS` for rows of ``length`` tokens, batch 1."""
    cfg = load(CONFIGS / ("tiny.py" if name == "transformer" else "tiny_hybrid.py"))
    model = dataclasses.replace(
        cfg.model, attention=AttentionConfig(backend="blockwise"), max_len=length
    )
    if name == "mamba2":
        model = dataclasses.replace(model, pattern="m")
    data = dataclasses.replace(cfg.data, seq_len=length, batch_size=1)
    return dataclasses.replace(
        cfg, model=model, data=data, mesh=dataclasses.replace(cfg.mesh, data=1)
    )


def _train_step(name: str, length: int):
    cfg = model_config(name, length).validate()
    s = runs.setup(cfg, devices=jax.devices()[:1])
    step = make_train_step(s.task.make_loss(s.graphdef), s.optimizer)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (1, length + 1), dtype=np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    with sharding.use(s.mesh, s.rules):
        batch = sharding.put_batch(host, s.mesh, s.task.batch_axes, s.rules)
        compiled = (
            jax.jit(step, donate_argnums=(0,)).lower(s.state, batch, jax.random.key(0)).compile()
        )
    holder = {"state": s.state}
    temp = int(compiled.memory_analysis().temp_size_in_bytes)

    def one() -> float:
        t = time.perf_counter()
        with sharding.use(s.mesh, s.rules):
            holder["state"], m = compiled(holder["state"], batch, jax.random.key(0))
            m["loss"].block_until_ready()
        return time.perf_counter() - t

    return one, temp


def _decode_step(name: str, context: int):
    cfg = model_config(name, context + 8)
    from_cfg = runs.setup(cfg.validate(), devices=jax.devices()[:1])
    model = nnx.merge(from_cfg.graphdef, from_cfg.state["params"]).for_decoding()
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1, context + 8)
    # A cache that already holds `context` tokens (their values do not change the cost).
    cache = tuple(
        c._replace(kv_ids=jnp.ones_like(c.kv_ids), index=jnp.asarray(context, jnp.int32))
        if isinstance(c, KVCache)
        else c
        for c in cache
    )
    decode = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s).decode(t, p, c))
    token = jnp.zeros((1, 1), jnp.int32)
    pos = jnp.full((1, 1), context, jnp.int32)
    jax.block_until_ready(decode(state, token, pos, cache))

    def one() -> float:
        t = time.perf_counter()
        jax.block_until_ready(decode(state, token, pos, cache))
        return time.perf_counter() - t

    return one


def _median(xs):
    return float(np.median(xs))


def run(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="mlgen bench long")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768])
    ap.add_argument("--rounds", type=int, default=3, help="timed calls of each (median)")
    ap.add_argument("--decode-calls", type=int, default=20, help="decode steps per round")
    a = ap.parse_args(argv)
    for flag in ("lengths", "contexts"):
        bad = [n for n in getattr(a, flag) if n <= 0]
        if bad:
            raise SystemExit(f"mlgen bench long: --{flag}: must be > 0, got {bad}")

    steps = {}
    for name in a.models:
        for T in a.lengths:
            fn, temp = _train_step(name, T)
            fn()  # warm-up
            steps[name, T] = (fn, temp, [])
    for _ in range(a.rounds):
        for (_, _), (fn, _, times) in steps.items():
            times.append(fn())
    for (name, T), (_, temp, times) in steps.items():
        med = _median(times)
        line = dict(bench="long", model=name, length=T, step_s=med, tokens_per_s=T / med)
        print(json.dumps(dict(line, temp_bytes=temp)), flush=True)

    decodes = {(n, c): (_decode_step(n, c), []) for n in a.models for c in a.contexts}
    for _ in range(a.rounds):
        for fn, times in decodes.values():
            times.append(sum(fn() for _ in range(a.decode_calls)) / a.decode_calls)
    for (name, c), (_, times) in decodes.items():
        line = dict(bench="long", model=name, context=c, decode_tokens_per_s=1 / _median(times))
        print(json.dumps(line), flush=True)

    lo, hi = min(a.lengths), max(a.lengths)
    for name in a.models:
        if lo == hi:
            break
        t_lo, t_hi = _median(steps[name, lo][2]), _median(steps[name, hi][2])
        m_lo, m_hi = steps[name, lo][1], steps[name, hi][1]
        span = math.log(hi / lo)
        out = dict(bench="long", model=name, lengths=[lo, hi])
        out["time_exponent"] = math.log(t_hi / t_lo) / span
        out["memory_exponent"] = math.log(max(m_hi, 1) / max(m_lo, 1)) / span
        print(json.dumps(out), flush=True)
