"""The ``mlgen`` subcommands (imported by ``mlgen.cli.main`` once JAX is configured)."""

from __future__ import annotations

import argparse
import sys

from mlgen import bench, runs
from mlgen.cli.generate import generate_main
from mlgen.cli.sample import eval_main, sample_main
from mlgen.config import ConfigError
from mlgen.data.tokenizer import tokenizer_main


def train_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mlgen train", description="Train or resume a run.")
    ap.add_argument("config", help="a config file defining get_config(), e.g. configs/lm/tiny.py")
    ap.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. train.num_steps=100"
    )
    a = ap.parse_args(argv)
    result = runs.train(a.config, a.overrides)
    final = {k: round(v, 5) for k, v in result.final_metrics.items() if isinstance(v, float)}
    print(f"done: step {result.final_metrics.get('step')} {final}")
    return 0


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: mlgen bench {{{','.join(bench.BENCHES)}}} [flags]  (each takes --help)")
        return 0
    bench.run(argv[0], argv[1:])
    return 0


COMMANDS = {
    "train": train_main,
    "generate": generate_main,
    "sample": sample_main,
    "eval": eval_main,
    "bench": bench_main,
    "tokenizer": tokenizer_main,
}


def run(command: str, argv: list[str], *, usage: str) -> int:
    """Runs ``command``; a config error is one line on stderr and exit status 2."""
    if command not in COMMANDS:
        print(f"mlgen: unknown command {command!r}\n\n{usage}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](argv) or 0
    except ConfigError as e:
        print(f"mlgen: config error: {e}", file=sys.stderr)
        return 2
