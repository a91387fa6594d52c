"""``mlgen bench attention``: time and peak memory of each attention backend vs length.

Causal forward + backward (the gradient of ``sum(out * dout)`` w.r.t. q, k, v) at B=1, N=8,
H=64 by default, for T in {1k, 2k, 4k, 8k, 16k, 32k}. Peak memory is what XLA's buffer
assignment plans for the compiled program (``compiled.memory_analysis()``: temp + argument
+ output bytes), read without running it, so it is exact for CPU and available even where a
run would not fit. A run is skipped (time "-") when that plan exceeds ``--max-run-gb``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from mlgen.ops import attention

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
PALLAS = ("pallas_gpu", "pallas_tpu")


def _parse(argv):
    p = argparse.ArgumentParser(prog="mlgen bench attention", description=__doc__.splitlines()[0])
    p.add_argument(
        "--lengths",
        default=",".join(str(t) for t in DEFAULT_LENGTHS),
        help="comma-separated sequence lengths T (=S); suffix k allowed, e.g. 1k,2k,4k",
    )
    p.add_argument("--max-len", type=str, default=None, help="drop lengths above this (e.g. 8k)")
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated backends (default: reference,xla,blockwise and the Pallas "
        "kernel of this platform)",
    )
    p.add_argument(
        "--interpret",
        action="store_true",
        help="also run Pallas kernels in interpret mode on CPU (timings meaningless; tiny T only)",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (best is reported)")
    p.add_argument(
        "--max-run-gb", type=float, default=8.0, help="skip running points planned above this"
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="stop timing a backend at longer lengths once one run takes this long",
    )
    p.add_argument("--png", default="bench_attention.png", help="plot path ('' for none)")
    return p.parse_args(argv)


def _length(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def _step_fn(backend: str, causal: bool, interpret: bool):
    def loss(q, k, v, do):
        out = attention(q, k, v, causal=causal, backend=backend, interpret=interpret)
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure_point(
    backend: str,
    T: int,
    *,
    B=1,
    N=8,
    K=None,
    H=64,
    dtype="float32",
    causal=True,
    interpret=False,
    repeats=3,
    max_run_bytes=8 << 30,
    run=True,
) -> dict:
    """Compile fwd+bwd for one point; return peak bytes (planned) and best time (s) or None."""
    K = K or N
    dt = jnp.dtype(dtype)
    shapes = [
        jax.ShapeDtypeStruct((B, T, N, H), dt),
        jax.ShapeDtypeStruct((B, T, K, H), dt),
        jax.ShapeDtypeStruct((B, T, K, H), dt),
        jax.ShapeDtypeStruct((B, T, N, H), dt),
    ]
    t0 = time.perf_counter()
    compiled = _step_fn(backend, causal, interpret).lower(*shapes).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    peak = None
    if ma is not None:
        peak = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
    best = None
    if run and (peak is None or peak <= max_run_bytes):
        rng = np.random.default_rng(0)
        args = [jnp.asarray(rng.standard_normal(s.shape, np.float32), dt) for s in shapes]
        jax.block_until_ready(compiled(*args))  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        best = min(times)
    return dict(backend=backend, T=T, peak_bytes=peak, time_s=best, compile_s=compile_s)


def _fmt_time(t):
    return "-" if t is None else (f"{t * 1e3:8.1f} ms" if t < 10 else f"{t:8.1f} s ")


def _fmt_mem(b):
    return "-" if b is None else f"{b / 2**20:9.1f} MiB"


def _backends(a: argparse.Namespace, platform: str) -> list[str]:
    if a.backends:
        return [b.strip() for b in a.backends.split(",") if b.strip()]
    return ["reference", "xla", "blockwise"] + [
        b for b in PALLAS if b.split("_")[1] == platform or a.interpret
    ]


def measure(argv: list[str], *, progress: Callable[[dict], None] | None = None) -> dict:
    """Runs ``mlgen bench attention``'s sweep with these flags (no table, no plot).

    Args:
      argv: the command's flags.
      progress: called with each point's dict as it is measured (the command prints it), so
        a long sweep shows where it is.

    Returns:
      ``{"bench": "mlgen-attention", ...the shape..., "points": [measure_point dicts]}``, one
      point per backend and length, backends outermost.
    """
    a = _parse(argv)
    lengths = [_length(s) for s in a.lengths.split(",") if s.strip()]
    if a.max_len:
        lengths = [t for t in lengths if t <= _length(a.max_len)]
    platform = jax.default_backend()
    backends = _backends(a, platform)
    interpret = a.interpret or platform == "cpu"
    points = []
    for backend in backends:
        slow = False
        for T in lengths:
            r = measure_point(
                backend,
                T,
                B=a.batch,
                N=a.heads,
                K=a.kv_heads,
                H=a.head_dim,
                dtype=a.dtype,
                causal=not a.no_causal,
                interpret=interpret and backend in PALLAS,
                repeats=a.repeats,
                max_run_bytes=int(a.max_run_gb * 2**30),
                run=not slow,
            )
            slow = slow or (r["time_s"] is not None and r["time_s"] > a.max_seconds)
            points.append(r)
            if progress is not None:
                progress(r)
    return {
        "bench": "mlgen-attention",
        "batch": a.batch,
        "heads": a.heads,
        "kv_heads": a.kv_heads or a.heads,
        "head_dim": a.head_dim,
        "dtype": a.dtype,
        "causal": not a.no_causal,
        "platform": platform,
        "lengths": lengths,
        "backends": backends,
        "points": points,
    }


def run(argv: list[str]) -> None:
    """Entry point of ``mlgen bench attention``; prints a table, writes a PNG plot if possible."""
    a = _parse(argv)
    platform = jax.default_backend()
    backends = _backends(a, platform)
    print(
        f"attention fwd+bwd, B={a.batch} N={a.heads} K={a.kv_heads or a.heads} H={a.head_dim} "
        f"{a.dtype} causal={not a.no_causal} on {platform} ({jax.devices()[0].device_kind}), "
        f"best of {a.repeats}"
    )
    print(
        "peak = XLA's planned buffers of the compiled program "
        "(memory_analysis(): temp + argument + output); "
        f"points planned above {a.max_run_gb} GiB are compiled but not run"
    )
    if any(b in PALLAS and b.split("_")[1] != platform for b in backends):
        print(
            "NOTE: Pallas kernels off their own hardware run in interpret mode: "
            "their timings mean nothing."
        )

    def show(r):
        print(
            f"  {r['backend']:11s} T={r['T']:6d}  time {_fmt_time(r['time_s'])}  "
            f"peak {_fmt_mem(r['peak_bytes'])}",
            flush=True,
        )

    m = measure(argv, progress=show)
    _table(m["points"], m["backends"], m["lengths"])
    if a.png:
        _plot(m["points"], m["backends"], a.png)


def _table(results, backends, lengths):
    by = {(r["backend"], r["T"]): r for r in results}
    head = "T".rjust(7) + "".join(f" | {b + ' time':>14s} {b + ' peak':>16s}" for b in backends)
    print("\n" + head + "\n" + "-" * len(head))
    for T in lengths:
        print(
            f"{T:7d}"
            + "".join(
                f" | {_fmt_time(by[b, T]['time_s']):>14s} {_fmt_mem(by[b, T]['peak_bytes']):>16s}"
                for b in backends
            )
        )
    for b in backends:
        p = {T: by[b, T]["peak_bytes"] for T in lengths}
        if 8192 in p and 32768 in p and p[8192] and p[32768]:
            print(f"{b}: peak(32k)/peak(8k) = {p[32768] / p[8192]:.2f}")
    if "xla" in backends and "blockwise" in backends:
        for T in lengths:
            tx, tb = by["xla", T]["time_s"], by["blockwise", T]["time_s"]
            if tx and tb:
                print(f"T={T}: blockwise speed / xla speed = {tx / tb:.2f}")


def _plot(results, backends, path):
    matplotlib.use("Agg")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for b in backends:
        rs = [r for r in results if r["backend"] == b]
        t = [(r["T"], r["time_s"]) for r in rs if r["time_s"]]
        m = [(r["T"], r["peak_bytes"] / 2**20) for r in rs if r["peak_bytes"]]
        if t:
            axes[0].plot(*zip(*t), marker="o", label=b)
        if m:
            axes[1].plot(*zip(*m), marker="o", label=b)
    for ax, title in zip(axes, ("fwd+bwd time (s)", "planned peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")
