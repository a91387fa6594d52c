"""``mlgen`` command line: train | plan | generate | sample | eval | bench | tokenizer | convert
| vae.

Global JAX settings (simulated CPU devices, platform, compilation cache, multi-host start) are
set here and only here, before anything imports JAX: that is why the commands are imported
inside :func:`main` (the one import of mlgen inside a function; it dodges no cycle).

Several processes (hosts): ``--coordinator HOST:PORT --num-processes N --process-id I`` on
each of them (or ``MLGEN_COORDINATOR`` / ``MLGEN_NUM_PROCESSES`` / ``MLGEN_PROCESS_ID``), or
``--distributed`` (``MLGEN_DISTRIBUTED=1``) where JAX finds the others itself (Cloud TPU, SLURM,
Open MPI, k8s): see :mod:`mlgen.distributed`. A bad combination is one line and exit status 2,
before JAX starts.

User errors (a bad flag, config value, config file, workdir or data path) are one line on stderr
and exit status 2, never a traceback: ``mlgen: config error: <field>: ...`` for a config,
``mlgen <command>: error: ...`` for the rest. ``--debug`` (before the command) shows the traceback.
Global options are read before the command only: ``mlgen sample W --num 4`` is ``sample``'s
``--num``, never an abbreviation of ``--num-processes``.

The persistent compilation cache: compiled programs are kept under ``~/.cache/mlgen/jax`` so a
rerun of the same config starts in seconds. ``--compilation-cache DIR`` (or the environment
variable ``MLGEN_COMPILATION_CACHE=DIR``) moves it, ``off`` turns it off.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jaxlib.version import __version__ as jaxlib_version

from mlgen import distributed
from mlgen.config import ConfigError

USAGE = """mlgen <command> [args]

commands:
  train CONFIG [key=value ...]     train (or resume) the run a config file describes
  plan CONFIG [key=value ...]      compile the train step ahead of time (--topology v5p:4x4x4
                                   for a TPU slice): memory per chip, FLOPs, step time, problems
  generate WORKDIR --prompt TEXT   sample text from a trained language model
  sample WORKDIR --out grid.png    sample images from a trained diffusion model
  eval WORKDIR                     score a digits diffusion model's samples
  bench NAME [flags]               benchmarks: train, generate, attention, ring, diffusion, peak,
                                   moe; all (the peers' shapes), compare (beside the peers)
  tokenizer train --input GLOB ... train a sentencepiece tokenizer
  convert import-hf SRC WORKDIR    a Hugging Face model (Llama, Mistral, Qwen2, Mixtral, GPT-2)
                                   as a run
  convert export-hf WORKDIR DST    a run's transformer as a Hugging Face model directory
  convert merge-lora WORKDIR DST   a LoRA run with its adapters folded into the weights
  vae encode WORKDIR --out z.npz   a trained VAE's latents of its data, and their scale factor
  vae decode WORKDIR z.npz --out grid.png
                                   latents back to images through a trained VAE

global options (before the command):
  --debug                          show the Python traceback of a user error (a bad flag, config,
                                   workdir), which is otherwise one line: mlgen ...: error: ...
  --cpu-devices N                  simulate N CPU devices (per process; XLA host platform devices)
  --platform NAME                  force a JAX platform (cpu, gpu, tpu)
  --compilation-cache DIR|off      where compiled programs are cached (default ~/.cache/mlgen/jax;
                                   also MLGEN_COMPILATION_CACHE)
  --coordinator HOST:PORT          several processes (hosts): process 0's address on every one,
  --num-processes N                with their number and this one's id in [0, N), all three (or
  --process-id I                   MLGEN_COORDINATOR, MLGEN_NUM_PROCESSES, MLGEN_PROCESS_ID)
  --distributed                    several processes that JAX finds itself: Cloud TPU, SLURM,
                                   Open MPI, k8s (also MLGEN_DISTRIBUTED=1)

examples:
  mlgen train configs/lm/tiny.py workdir=/tmp/tiny train.num_steps=100
  mlgen generate /tmp/tiny --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-k 40
  mlgen --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0 train configs/lm/tiny.py
"""

DEFAULT_CACHE = os.path.join("~", ".cache", "mlgen", "jax")


# XLA:CPU on jaxlib 0.10 routes convolutions and dots through YNNPACK fusions by default; on
# this project's 2-core CPU Eigen's are faster (measured 2026-12-02, `mlgen bench diffusion
# --size 16 --channels 32 64 --layers-per-block 1`: 1.05 -> 0.75 s/step; `mlgen bench train`:
# 3.08 -> 2.88 s/step). A user's own setting of the flag in XLA_FLAGS wins. Only on 0.10.x,
# where it was measured: XLA aborts on a flag its version does not know.
_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _cpu_xla_flags(flags: str, jaxlib_version: str) -> str:
    """XLA_FLAGS with mlgen's XLA:CPU default added (see ``_CPU_FLAG``)."""
    if not jaxlib_version.startswith("0.10.") or "ynn_fusion_type" in flags:
        return flags
    return f"{flags} {_CPU_FLAG}".strip()


def _set_jax_globals(
    cpu_devices: int | None, platform: str | None, cache: str | None, world: dict
) -> None:
    flags = _cpu_xla_flags(os.environ.get("XLA_FLAGS", ""), jaxlib_version)
    if cpu_devices:
        flags = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
    os.environ["XLA_FLAGS"] = flags
    if cpu_devices:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if platform:
        os.environ["JAX_PLATFORMS"] = platform
    import jax

    distributed.initialize(**world, cpu_devices=cpu_devices)
    cache = cache or os.environ.get("MLGEN_COMPILATION_CACHE", DEFAULT_CACHE)
    if cache != "off":
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _int_option(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}: must be an integer, got {value!r}") from None


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
    # allow_abbrev=False and REMAINDER: only the options before the command are global ones
    # (``--num`` of ``mlgen sample`` is no abbreviation of ``--num-processes``).
    ap = argparse.ArgumentParser(prog="mlgen", usage=USAGE, add_help=False, allow_abbrev=False)
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("--debug", action="store_true")
    ap.add_argument("--cpu-devices", type=int, default=None)
    ap.add_argument("--platform", default=None)
    ap.add_argument("--compilation-cache", default=None)
    ap.add_argument("--coordinator", default=os.environ.get("MLGEN_COORDINATOR"))
    ap.add_argument("--num-processes", default=os.environ.get("MLGEN_NUM_PROCESSES"))
    ap.add_argument("--process-id", default=os.environ.get("MLGEN_PROCESS_ID"))
    # MLGEN_DISTRIBUTED=1 is set by tpu_scripts/pod.sh on every pod worker.
    ap.add_argument("--distributed", action="store_true")
    ap.add_argument("command", nargs="?")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    g, unknown = ap.parse_known_args(argv)
    if unknown:
        print(
            f"mlgen: error: unknown global option {unknown[0]!r} (see mlgen --help)",
            file=sys.stderr,
        )
        return 2
    if not g.command:
        print(USAGE)
        return 0
    rest = ["--help"] + g.rest if g.help else g.rest
    try:  # before JAX starts: a bad combination is one line
        world = dict(
            coordinator=g.coordinator or None,
            num_processes=_int_option(g.num_processes, "--num-processes"),
            process_id=_int_option(g.process_id, "--process-id"),
            auto=g.distributed or os.environ.get("MLGEN_DISTRIBUTED") == "1",
        )
        distributed.check_options(**world, cpu_devices=g.cpu_devices, names=distributed.CLI_NAMES)
    except ConfigError as e:
        print(f"mlgen: {e}", file=sys.stderr)
        return 2
    _set_jax_globals(g.cpu_devices, g.platform, g.compilation_cache, world)
    _setup_logging()
    from mlgen.cli import commands  # after the JAX settings above: this imports JAX

    return commands.run(g.command, rest, usage=USAGE, debug=g.debug)
