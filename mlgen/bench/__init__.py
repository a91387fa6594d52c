"""Benchmarks behind ``mlgen bench NAME``; each module has ``run(argv)`` and prints JSON lines.

``train``, ``generate``, ``diffusion`` and ``attention`` also have ``measure(argv) -> dict``
(what the JSON line holds), which ``all`` (:mod:`mlgen.bench.suite`) calls in turn;
``compare`` (:mod:`mlgen.bench.compare`) runs them beside the peers and writes the README table.
"""

from mlgen.bench import attention, compare, diffusion, generate, long, moe, peak, ring, suite, train
from mlgen.bench.timing import median_time, time_train_step

BENCHES = {
    "train": train.run,
    "generate": generate.run,
    "attention": attention.run,
    "ring": ring.run,
    "diffusion": diffusion.run,
    "peak": peak.run,
    "moe": moe.run,
    "long": long.run,
    "all": suite.run,
    "compare": compare.run,
}


def run(name: str, argv: list[str]) -> None:
    if name not in BENCHES:
        raise SystemExit(f"mlgen bench: unknown benchmark {name!r}; choose from {sorted(BENCHES)}")
    BENCHES[name](argv)


__all__ = ["BENCHES", "median_time", "run", "time_train_step"]
