"""Benchmarks behind ``mlgen bench NAME``; each module has ``run(argv)`` and prints JSON lines."""

import importlib

BENCHES = {
    "train": "mlgen.bench.train",
    "generate": "mlgen.bench.generate",
    "attention": "mlgen.bench.attention",
    "ring": "mlgen.bench.ring",
    "diffusion": "mlgen.bench.diffusion",
}


def run(name: str, argv: list[str]) -> None:
    if name not in BENCHES:
        raise SystemExit(f"mlgen bench: unknown benchmark {name!r}; choose from {sorted(BENCHES)}")
    importlib.import_module(BENCHES[name]).run(argv)


def median_time(fn, *, steps: int, warmup: int) -> float:
    """Median wall time of ``fn()`` (which must block until its work is done)."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]
