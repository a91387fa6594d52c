"""``mlgen bench moe``: the MoE dispatch paths side by side, forward + backward.

Times ``jax.grad`` of ``sum(y^2)`` through routing and dispatch (w.r.t. the tokens, the router
and the three stacked expert weights) for each path: ``ragged`` (``jax.lax.ragged_dot``
grouped matmuls), ``blocked`` (sort + dense blocks, at each ``--block-size``) and ``capacity``
(``[E, G, D]`` buffers at ``--capacity-factor``). Paths are run in turns (one timed call of
each per round) so that load from other processes falls on all of them alike; each line of
JSON reports one path's median over the rounds.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp

from mlgen.ops import moe


def _step(path: str, *, k: int, block_size: int, capacity_factor: float):
    def loss(x, w_router, w_gate, w_up, w_down):
        weights, experts, _ = moe.route(x @ w_router, k, renormalize=True)
        if path == "capacity":
            y, _ = moe.capacity(
                x, weights, experts, w_gate, w_up, w_down, capacity_factor=capacity_factor
            )
        else:
            y, _ = moe.dropless(
                x, weights, experts, w_gate, w_up, w_down, impl=path, block_size=block_size
            )
        return jnp.sum(jnp.square(y))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def run(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="mlgen bench moe")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--mlp-dim", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--block-size", type=int, nargs="+", default=[128])
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--paths", default="ragged,blocked,capacity")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    T, D, F, E = a.tokens, a.d_model, a.mlp_dim, a.experts
    keys = jax.random.split(jax.random.key(0), 5)
    args = (
        jax.random.normal(keys[0], (T, D)),
        jax.random.normal(keys[1], (D, E)) * D**-0.5,
        jax.random.normal(keys[2], (E, D, F)) * D**-0.5,
        jax.random.normal(keys[3], (E, D, F)) * D**-0.5,
        jax.random.normal(keys[4], (E, F, D)) * F**-0.5,
    )
    make = functools.partial(_step, k=a.k, capacity_factor=a.capacity_factor)
    runs: dict[str, tuple[dict, object]] = {}
    for path in a.paths.split(","):
        sizes = a.block_size if path == "blocked" else [a.block_size[0]]
        for b in sizes:
            name = f"blocked{b}" if path == "blocked" and len(sizes) > 1 else path
            info = {"path": path} | ({"block_size": b} if path == "blocked" else {})
            runs[name] = (info, make(path, block_size=b))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(a.rounds + 1):  # the first round compiles and warms up
        for name, (_, fn) in runs.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t)
    shape = {"tokens": T, "d_model": D, "mlp_dim": F, "experts": E, "k": a.k}
    for name, (info, _) in runs.items():
        ts = sorted(times[name][1:])
        print(
            json.dumps(
                {
                    "bench": "mlgen-moe",
                    **info,
                    **shape,
                    **({"capacity_factor": a.capacity_factor} if name == "capacity" else {}),
                    "median_s": ts[len(ts) // 2],
                    "min_s": ts[0],
                    "platform": jax.devices()[0].platform,
                }
            )
        )
