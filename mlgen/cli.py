"""``mlgen`` command line: train | generate | sample | eval | bench | tokenizer.

Global JAX settings (simulated CPU devices, compilation cache) are set here and only here,
before JAX is imported by any subcommand.
"""

from __future__ import annotations

import argparse
import os
import sys

USAGE = """mlgen <command> [args]

commands:
  train CONFIG [key=value ...]     train (or resume) the run a config file describes
  generate WORKDIR --prompt TEXT   sample text from a trained language model
  sample WORKDIR --out grid.png    sample images from a trained diffusion model
  eval WORKDIR                     score a digits diffusion model's samples
  bench NAME [flags]               benchmarks: train, generate, attention, ring, diffusion
  tokenizer train --input GLOB ... train a sentencepiece tokenizer

global options (before the command):
  --cpu-devices N                  simulate N CPU devices (XLA host platform device count)
  --platform NAME                  force a JAX platform (cpu, gpu, tpu)

examples:
  mlgen train configs/lm/tiny.py workdir=/tmp/tiny train.num_steps=100
  mlgen generate /tmp/tiny --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-k 40
"""


def _set_jax_globals(cpu_devices: int | None, platform: str | None) -> None:
    if cpu_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if platform:
        os.environ["JAX_PLATFORMS"] = platform
    import jax

    if os.environ.get("MLGEN_DISTRIBUTED") == "1":  # set by tpu_scripts/pod.sh on every pod worker
        jax.distributed.initialize()
    cache = os.environ.get("MLGEN_COMPILATION_CACHE", os.path.expanduser("~/.cache/mlgen/jax"))
    if cache != "off":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _train(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mlgen train", description="Train or resume a run.")
    ap.add_argument("config", help="a config file defining get_config(), e.g. configs/lm/tiny.py")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.num_steps=100")
    a = ap.parse_args(argv)
    from mlgen.train.trainer import train

    result = train(a.config, a.overrides)
    final = {k: round(v, 5) for k, v in result.final_metrics.items() if isinstance(v, float)}
    print(f"done: step {result.final_metrics.get('step')} {final}")
    return 0


def _dispatch(cmd: str, argv: list[str]) -> int:
    if cmd == "train":
        return _train(argv)
    if cmd == "generate":
        from mlgen.samplers.lm import generate_main

        return generate_main(argv) or 0
    if cmd == "sample":
        from mlgen.samplers.diffusion import sample_main

        return sample_main(argv) or 0
    if cmd == "eval":
        from mlgen.evaluation.digits import eval_main

        return eval_main(argv) or 0
    if cmd == "bench":
        if not argv or argv[0] in ("-h", "--help"):
            from mlgen.bench import BENCHES

            print(f"usage: mlgen bench {{{','.join(BENCHES)}}} [flags]  (each takes --help)")
            return 0
        from mlgen.bench import run

        run(argv[0], argv[1:])
        return 0
    if cmd == "tokenizer":
        from mlgen.data.tokenizer import tokenizer_main

        return tokenizer_main(argv) or 0
    print(f"mlgen: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="mlgen", usage=USAGE, add_help=False)
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("--cpu-devices", type=int, default=None)
    ap.add_argument("--platform", default=None)
    ap.add_argument("command", nargs="?")
    g, rest = ap.parse_known_args(argv)
    if g.help and not g.command or not g.command:
        print(USAGE)
        return 0
    if g.help:
        rest = ["--help"] + rest
    _set_jax_globals(g.cpu_devices, g.platform)
    from mlgen.config import ConfigError

    try:
        return _dispatch(g.command, rest)
    except ConfigError as e:
        print(f"mlgen: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
