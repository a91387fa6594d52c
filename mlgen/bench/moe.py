"""``mlgen bench moe``: the MoE dispatch paths side by side, forward + backward.

Times ``jax.grad`` of ``sum(y^2)`` through routing and dispatch (w.r.t. the tokens, the router
and the three stacked expert weights) for each path: ``ragged`` (``jax.lax.ragged_dot``
grouped matmuls), ``blocked`` (sort + dense blocks, at each ``--block-size``) and ``capacity``
(``[E, G, D]`` buffers at ``--capacity-factor``). Paths are run in turns (one timed call of
each per round) so that load from other processes falls on all of them alike; each line of
JSON reports one path's median over the rounds.

``--expert-shards 1 4`` times the ``mlgen.nn.moe.MoE`` layer instead (its ``loss`` added;
gradients w.r.t. the input and every parameter) on a mesh of all devices for each number of
expert shards e (``mesh.expert=e``, ``mesh.data`` the rest; ``--tokens`` split as a batch of
``--batch`` rows), and beside each expert-parallel run the same four all-to-alls of the
exchange buffers alone (``exchange_s``: forward there and back plus their transposes in the
backward pass), e.g. ``mlgen --cpu-devices 4 bench moe --expert-shards 1 4``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mlgen import sharding
from mlgen.config import MeshConfig
from mlgen.nn.moe import MoE, MoEConfig
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
    ap.add_argument("--expert-shards", type=int, nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args(argv)
    if a.expert_shards:
        return _layer_on_meshes(a)
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


def _layer_on_meshes(a) -> None:
    """``--expert-shards``: the layer's forward + backward on each mesh, in turns."""
    B, D, F, E, k = a.batch, a.d_model, a.mlp_dim, a.experts, a.k
    x = jax.random.normal(jax.random.key(0), (B, a.tokens // B, D))
    runs: dict[str, tuple[dict, object, tuple]] = {}
    for path in a.paths.split(","):
        dispatch = "capacity" if path == "capacity" else "dropless"
        impl = "auto" if path == "capacity" else path
        cfg = MoEConfig(
            num_experts=E,
            experts_per_token=k,
            dispatch=dispatch,
            capacity_factor=a.capacity_factor,
            grouped_impl=impl,
            block_size=a.block_size[0],
        )
        for e in a.expert_shards:
            mesh = sharding.make_mesh(MeshConfig(data=-1, expert=e))
            with sharding.use(mesh, "auto"):
                gd, params, _ = sharding.sharded_init(
                    lambda cfg=cfg: MoE(D, F, cfg, rngs=nnx.Rngs(0)), mesh
                )
                xs = jax.device_put(x, NamedSharding(mesh, sharding.spec(("batch", "length"))))

                def loss(p, x, gd=gd):
                    y, aux = nnx.merge(gd, p)(x)
                    return jnp.sum(jnp.square(y)) + aux["loss"]

                step = jax.jit(jax.grad(loss, argnums=(0, 1)))
                step = step.lower(params, xs).compile()
            info = {"path": path, "expert_shards": e, "mesh": dict(mesh.shape)}
            runs[f"{path}-{e}"] = (info, step, (params, xs))
            if e > 1:
                shape = _exchange_shape(dispatch, a.tokens // mesh.size, k, E, e, D, cfg)
                buf = jax.device_put(
                    jnp.zeros((mesh.size * shape[0], *shape[1:])),
                    NamedSharding(mesh, P(mesh.axis_names)),
                )
                four = jax.jit(
                    jax.shard_map(
                        lambda b: functools.reduce(
                            lambda b, _: jax.lax.all_to_all(b, "expert", 0, 0), range(4), b
                        ),
                        mesh=mesh,
                        in_specs=P(mesh.axis_names),
                        out_specs=P(mesh.axis_names),
                    )
                )
                runs[f"{path}-{e}-exchange"] = ({**info, "exchange": list(shape)}, four, (buf,))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(a.rounds + 1):  # the first round warms up
        for name, (_, fn, args) in runs.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t)
    for name, (info, _, _) in runs.items():
        if name.endswith("-exchange"):
            continue
        ts = sorted(times[name][1:])
        row = {"bench": "mlgen-moe-layer", **info, "tokens": a.tokens, "d_model": D}
        row |= {"mlp_dim": F, "experts": E, "k": k, "median_s": ts[len(ts) // 2], "min_s": ts[0]}
        if f"{name}-exchange" in times:
            ex = sorted(times[f"{name}-exchange"][1:])
            row |= {"exchange": runs[f"{name}-exchange"][0]["exchange"]}
            row |= {"exchange_s": ex[len(ex) // 2]}
        print(json.dumps(row | {"platform": jax.devices()[0].platform}))


def _exchange_shape(dispatch, tokens, k, E, n, D, cfg) -> tuple[int, ...]:
    """One device's exchange buffer (``mlgen.ops.moe_parallel``): ``[n, El, G, D]`` (capacity)
    or ``[n, T_l * min(k, El), D]`` (dropless)."""
    El = E // n
    if dispatch == "capacity":
        return (n, El, moe.capacity_of(tokens, k, E, cfg.capacity_factor), D)
    return (n, tokens * min(k, El), D)
