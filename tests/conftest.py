"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere.

XLA:CPU compiles the tests' programs without LLVM optimisation
(``--xla_backend_optimization_level=0``): the suite is mostly compile time of tiny programs
(a tiny UNet's random init took 28 s to compile at the default level, 4 s at 0; its gradient
18 s against 8 s), and the suite ran in 11 minutes instead of 16-17. What this does not
cover: XLA's optimised CPU code. Benchmarks and the README's runs use the default level.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Tests compile the same small programs many times (every trainer run, every mesh): a
# persistent compilation cache for the session turns the repeats into cache hits.
jax.config.update(
    "jax_compilation_cache_dir",
    os.path.join(tempfile.gettempdir(), f"mlgen-test-jax-cache-{os.getpid()}"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
