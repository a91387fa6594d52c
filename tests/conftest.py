"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere.

XLA:CPU compiles the tests' programs without LLVM optimisation
(``--xla_backend_optimization_level=0``): the suite is mostly compile time of tiny programs
(a tiny UNet's random init took 28 s to compile at the default level, 4 s at 0; its gradient
18 s against 8 s), and the suite ran in 11 minutes instead of 16-17. What this does not
cover: XLA's optimised CPU code. Benchmarks and the README's runs use the default level.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The in-process CLI calls (``mlgen.cli.main``) would turn on mlgen's ~/.cache cache: see below.
os.environ["MLGEN_COMPILATION_CACHE"] = "off"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# No persistent compilation cache in the test process. With one (per session, every entry
# kept), a second ``mlgen.train`` of a config in the same process ran the train step loaded back
# from the cache, and that executable aborted the process ("Fatal Python error: Aborted" in
# block_until_ready) in 2 of 3 runs of tests/train/test_trainer.py -k "loss_falls or
# deterministic" on jax 0.10.2; without the cache 3 of 3 passed (measured 2026-12-01). The
# multi-process tests still give their child processes a cache (``--compilation-cache``):
# entries written by one process and read by another did not fail.
