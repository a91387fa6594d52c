"""The ``mlgen`` subcommands (imported by ``mlgen.cli.main`` once JAX is configured)."""

from __future__ import annotations

import dataclasses
import json
import sys

from mlgen import bench, planner, runs
from mlgen.cli.args import Parser
from mlgen.cli.convert import convert_main
from mlgen.cli.generate import generate_main
from mlgen.cli.sample import eval_main, sample_main
from mlgen.cli.vae import vae_main
from mlgen.config import ConfigError, InputError, check
from mlgen.data.tokenizer import tokenizer_main
from mlgen.train.errors import RunError


def train_main(argv: list[str]) -> int:
    ap = Parser(prog="mlgen train", description="Train or resume a run.")
    ap.add_argument("config", help="a config file defining get_config(), e.g. configs/lm/tiny.py")
    ap.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. train.num_steps=100"
    )
    a = ap.parse_args(argv)
    result = runs.train(a.config, a.overrides)
    if result.preempted:  # the trainer said so in one line; the run resumes from there
        return 0
    final = {k: round(v, 5) for k, v in result.final_metrics.items() if isinstance(v, float)}
    print(f"done: step {result.final_metrics.get('step')} {final}")
    return 0


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: mlgen bench {{{','.join(bench.BENCHES)}}} [flags]  (each takes --help)")
        return 0
    bench.run(argv[0], argv[1:])
    return 0


def plan_main(argv: list[str]) -> int:
    """``mlgen plan CONFIG [key=value ...] [--topology T] [--budget-gib G] [--json]``; exit 1
    when a problem is found."""
    ap = Parser(
        prog="mlgen plan",
        description="Compile a run's train step ahead of time: memory, FLOPs, step time, problems.",
    )
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--topology", default=None, help="a TPU slice, e.g. v5p:4x4x4 (libtpu)")
    ap.add_argument("--budget-gib", type=float, default=None, help="per-chip memory budget")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the report")
    ap.add_argument(
        "--unrolled-flops",
        choices=("auto", "on", "off"),
        default="auto",
        help="count every layer of a scanned stack from 2- and 4-layer unrolled compiles",
    )
    ap.add_argument(
        "--decode-context",
        type=int,
        default=None,
        help="also size the decode-time cache (KV + SSM state) at this many tokens",
    )
    ap.add_argument("--decode-batch", type=int, default=1, help="sequences in that cache")
    ap.add_argument(
        "--decode-only",
        action="store_true",
        help="only the decode cache (with --decode-context): no train-step compile",
    )
    a = ap.parse_intermixed_args(argv)
    check(
        not a.decode_only or a.decode_context is not None,
        "--decode-only",
        "needs --decode-context N",
        InputError,
    )
    cache = (
        None
        if a.decode_context is None
        else planner.decode_cache(
            a.config, a.overrides, context=a.decode_context, batch=a.decode_batch
        )
    )
    if a.decode_only:
        print(json.dumps(dataclasses.asdict(cache)) if a.json else cache.report())
        return 0
    check(
        a.budget_gib is None or a.budget_gib > 0,
        "--budget-gib",
        f"must be > 0 GiB, got {a.budget_gib}",
        InputError,
    )
    p = planner.plan(
        a.config,
        a.overrides,
        topology=a.topology,
        budget_gib=a.budget_gib,
        unrolled_flops={"auto": None, "on": True, "off": False}[a.unrolled_flops],
    )
    if a.json:
        out = p.to_dict()
        if cache is not None:
            out["decode_cache"] = dataclasses.asdict(cache)
        print(json.dumps(out))
    else:
        print(p.report() + ("" if cache is None else "\n" + cache.report()))
    return 1 if p.problems else 0


COMMANDS = {
    "train": train_main,
    "generate": generate_main,
    "sample": sample_main,
    "eval": eval_main,
    "bench": bench_main,
    "plan": plan_main,
    "tokenizer": tokenizer_main,
    "convert": convert_main,
    "vae": vae_main,
}


def run(command: str, argv: list[str], *, usage: str, debug: bool = False) -> int:
    """Runs ``command``. A user error is one line on stderr and exit status 2:
    ``mlgen: config error: <field>: ...`` for a config (``ConfigError``),
    ``mlgen <command>: error: ...`` for a flag, workdir or file (``InputError``); a run that
    cannot go on (``mlgen.train.errors``) one line and its status (3: diverged); ``debug``
    re-raises either (the traceback)."""
    if command not in COMMANDS:
        del usage  # the commands are listed in one line; ``mlgen`` alone prints the usage
        print(
            f"mlgen: error: unknown command {command!r}; commands: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    try:
        return COMMANDS[command](argv) or 0
    except RunError as e:
        if debug:
            raise
        print(f"mlgen: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before training started (the trainer handles its own)
        print("mlgen: interrupted", file=sys.stderr)
        return 130
    except ConfigError as e:
        if debug:
            raise
        line = " ".join(str(e).split())  # one line, whatever a message holds
        if isinstance(e, InputError):
            print(f"mlgen {command}: error: {line}", file=sys.stderr)
        else:
            print(f"mlgen: config error: {line}", file=sys.stderr)
        return 2
