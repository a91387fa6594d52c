"""``mlgen bench ring``: ring attention's per-device memory and step time as context grows
with devices.

For n = 1, 2, 4, 8 devices (a mesh with only the ``seq`` axis) the total context is ``T * n``,
so each device always holds T queries/keys. Each row: the compiled program's per-device peak
memory (XLA ``memory_analysis``; arguments + outputs + temporaries, no aliasing) and the
median wall time of forward + backward (``jax.grad`` of a weighted sum of the output w.r.t.
q, k, v). n = 1 is the local backend alone (ring_attention on a 1-device axis). Target: memory
at n = 8 (context 8T) within 1.25x of n = 1 (context T).

On CPU, run with simulated devices: ``mlgen --cpu-devices 8 bench ring`` (all "devices" then
share the host's cores, so time grows with n; the memory column is what carries over).
Prints a table and one JSON line per row.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlgen.bench.timing import median_time
from mlgen.ops.attention.ring import ring_attention


def _peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    peak = getattr(m, "peak_memory_in_bytes", 0) or 0
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return int(max(peak, total))


def run(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="mlgen bench ring")
    ap.add_argument("--T", type=int, default=1024, help="tokens per device (total context T * n)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument(
        "--bidirectional", action="store_true", help="non-causal attention (default causal)"
    )
    ap.add_argument("--no-load-balance", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args(argv)

    dt = jnp.dtype(a.dtype)
    causal = not a.bidirectional
    rows = []
    for n in (int(x) for x in a.devices.split(",")):
        if n > len(jax.devices()):
            print(
                f"skipping n={n}: only {len(jax.devices())} devices "
                "(use mlgen --cpu-devices 8 on CPU)"
            )
            continue
        mesh = Mesh(np.asarray(jax.devices()[:n]), ("seq",), axis_types=(AxisType.Auto,))
        sh = NamedSharding(mesh, P(None, "seq"))
        L = a.T * n
        shapes = (
            (a.batch, L, a.heads, a.head_dim),
            (a.batch, L, a.kv_heads, a.head_dim),
            (a.batch, L, a.kv_heads, a.head_dim),
            (a.batch, L, a.heads, a.head_dim),
        )
        make = jax.jit(
            lambda: tuple(
                jax.random.normal(jax.random.key(i), s, dt) for i, s in enumerate(shapes)
            ),
            out_shardings=(sh,) * 4,
        )
        q, k, v, w = make()

        def loss(q, k, v, w):
            out = ring_attention(
                q, k, v, mesh=mesh, causal=causal, load_balance=not a.no_load_balance
            )
            return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32))

        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), out_shardings=(sh,) * 3)
        compiled = step.lower(q, k, v, w).compile()
        mem = _peak_bytes(compiled)

        def one():
            jax.block_until_ready(compiled(q, k, v, w))

        t = median_time(one, steps=a.steps, warmup=a.warmup)
        rows.append(
            dict(
                bench="mlgen-ring",
                devices=n,
                context=L,
                tokens_per_device=a.T,
                causal=causal,
                peak_mib_per_device=mem / 2**20,
                step_s=t,
                dtype=a.dtype,
            )
        )
    if not rows:
        return
    base = rows[0]["peak_mib_per_device"]
    print(
        f"\nring attention fwd+bwd, {'causal' if causal else 'bidirectional'}, "
        f"B={a.batch} N={a.heads} K={a.kv_heads} H={a.head_dim} {a.dtype}, "
        f"{a.T} tokens per device "
        f"({jax.devices()[0].platform}, {jax.device_count()} devices)"
    )
    print(
        f"{'n':>3} {'context':>8} {'peak MiB/device':>16} "
        f"{'vs n=' + str(rows[0]['devices']):>8} {'step s':>8}"
    )
    for r in rows:
        r["mem_ratio"] = r["peak_mib_per_device"] / base
        print(
            f"{r['devices']:>3} {r['context']:>8} {r['peak_mib_per_device']:>16.2f} "
            f"{r['mem_ratio']:>8.2f} {r['step_s']:>8.3f}"
        )
    for r in rows:
        print(json.dumps(r))
