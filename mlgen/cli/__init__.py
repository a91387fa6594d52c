"""``mlgen`` command line: train | generate | sample | eval | bench | tokenizer.

Global JAX settings (simulated CPU devices, platform, compilation cache, multi-host start) are
set here and only here, before anything imports JAX: that is why the commands are imported
inside :func:`main` (the one import of mlgen inside a function; it dodges no cycle).

The persistent compilation cache: compiled programs are kept under ``~/.cache/mlgen/jax`` so a
rerun of the same config starts in seconds. ``--compilation-cache DIR`` (or the environment
variable ``MLGEN_COMPILATION_CACHE=DIR``) moves it, ``off`` turns it off.
"""

from __future__ import annotations

import argparse
import logging
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
  --compilation-cache DIR|off      where compiled programs are cached (default ~/.cache/mlgen/jax;
                                   also MLGEN_COMPILATION_CACHE)

examples:
  mlgen train configs/lm/tiny.py workdir=/tmp/tiny train.num_steps=100
  mlgen generate /tmp/tiny --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-k 40
"""

DEFAULT_CACHE = os.path.join("~", ".cache", "mlgen", "jax")


def _set_jax_globals(cpu_devices: int | None, platform: str | None, cache: str | None) -> None:
    if cpu_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if platform:
        os.environ["JAX_PLATFORMS"] = platform
    import jax

    if os.environ.get("MLGEN_DISTRIBUTED") == "1":  # set by tpu_scripts/pod.sh on every pod worker
        jax.distributed.initialize()
    cache = cache or os.environ.get("MLGEN_COMPILATION_CACHE", DEFAULT_CACHE)
    if cache != "off":
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _setup_logging() -> None:
    """mlgen's own INFO lines (the attention backends chosen, ...) on stderr, once."""
    logger = logging.getLogger("mlgen")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mlgen: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="mlgen", usage=USAGE, add_help=False)
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("--cpu-devices", type=int, default=None)
    ap.add_argument("--platform", default=None)
    ap.add_argument("--compilation-cache", default=None)
    ap.add_argument("command", nargs="?")
    g, rest = ap.parse_known_args(argv)
    if not g.command:
        print(USAGE)
        return 0
    if g.help:
        rest = ["--help"] + rest
    _set_jax_globals(g.cpu_devices, g.platform, g.compilation_cache)
    _setup_logging()
    from mlgen.cli import commands  # after the JAX settings above: this imports JAX

    return commands.run(g.command, rest, usage=USAGE)
