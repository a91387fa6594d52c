"""``mlgen bench all``: train, generate, diffusion and attention on the peers' shapes.

One JSON line per benchmark, as each finishes, each naming its bench (``"bench":
"mlgen-train"``, ...). The benchmarks run one after the other in this process through their
modules' own ``measure(argv)``, on :mod:`mlgen.bench.shapes` (the peers' defaults; attention on
the attention inside the LM peers' step). Ratios against the peers need the peers run beside
them: that is ``mlgen bench compare``. ``--quick`` runs tiny shapes and one timed step: the
command's plumbing in seconds (a test), its numbers meaningless.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from mlgen.bench import attention, diffusion, generate, train
from mlgen.bench.shapes import LM_ATTENTION, LM_GENERATE, LM_TRAIN, UNET_TRAIN
from mlgen.config import InputError

_ONE_STEP = ["--steps", "1", "--warmup", "1"]
_TINY_LM = ["--layers", "1", "--width", "32", "--heads", "2", "--batch", "8"]

# name -> (measure, flags on the peers' shapes, flags of --quick)
SUITE: dict[str, tuple[Callable[[list[str]], dict], list[str], list[str]]] = {
    "train": (train.measure, LM_TRAIN.argv(), [*_TINY_LM, "--seq", "16", *_ONE_STEP]),
    "generate": (
        generate.measure,
        LM_GENERATE.argv(),
        [*_TINY_LM, "--vocab", "64", "--prompt", "4", "--new", "3", "--repeats", "1"],
    ),
    "diffusion": (
        diffusion.measure,
        UNET_TRAIN.argv(),
        ["--size", "8", "--channels", "32", "--layers-per-block", "1", "--batch", "8", *_ONE_STEP],
    ),
    "attention": (
        attention.measure,
        [*LM_ATTENTION.argv(), "--png", ""],
        ["--batch", "1", "--lengths", "16", "--heads", "2", "--head-dim", "16", "--repeats", "1"],
    ),
}


def run(argv: list[str]) -> None:
    """``mlgen bench all [--quick] [--only NAME,...]``: one JSON line per benchmark."""
    ap = argparse.ArgumentParser(prog="mlgen bench all", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one step (a smoke test)")
    ap.add_argument(
        "--only",
        default=",".join(SUITE),
        help=f"comma-separated benchmarks to run, in this order (default: {','.join(SUITE)})",
    )
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITE]
    if unknown or not names:
        raise InputError(f"--only: unknown benchmark(s) {unknown}; choose from {list(SUITE)}")
    for name in names:
        measure, full, quick = SUITE[name]
        print(json.dumps({**measure(quick if a.quick else full), "quick": a.quick}), flush=True)
