"""Several JAX processes as one world: ``jax.distributed.initialize`` with mlgen's checks.

Call it once per process before any JAX computation (the CLI's global options do)::

    # every host of a TPU pod / SLURM / Open MPI / k8s job: JAX finds the others itself
    mlgen.distributed.initialize(auto=True)

    # or named explicitly, e.g. two processes on one machine, 4 simulated CPU devices each
    mlgen.distributed.initialize("127.0.0.1:12355", 2, process_id, cpu_devices=4)

Then ``jax.devices()`` holds every process's devices and ``jax.local_devices()`` this one's;
the trainer gives each process its shard of the data, and only process 0 writes metrics.
On CPU the processes' collectives go through gloo (``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from mlgen.config import ConfigError, check

# The options' names as the CLI spells them (errors name what the user typed).
CLI_NAMES = {
    "coordinator": "--coordinator",
    "num_processes": "--num-processes",
    "process_id": "--process-id",
    "cpu_devices": "--cpu-devices",
}


def check_options(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    cpu_devices: int | None = None,
    names: Mapping[str, str] | None = None,
) -> bool:
    """Checks a combination of options; returns whether it asks for several processes.

    Without ``auto`` the three of ``coordinator`` (``HOST:PORT``), ``num_processes`` and
    ``process_id`` come together or not at all. With ``auto`` JAX detects the cluster and
    those given only override what it detects.

    Raises:
      ConfigError: one line naming the option (as ``names`` spells it; default the argument).
    """
    names = {**{k: k for k in CLI_NAMES}, **(names or {})}
    given = {
        "coordinator": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if cpu_devices is not None:
        check(cpu_devices >= 1, names["cpu_devices"], f"must be >= 1, got {cpu_devices}")
    if coordinator is not None:
        host, sep, port = str(coordinator).rpartition(":")
        check(
            bool(sep and host and port.isdigit() and 0 < int(port) < 65536),
            names["coordinator"],
            f"must be HOST:PORT (e.g. 10.0.0.1:1234), got {coordinator!r}",
        )
    if num_processes is not None:
        check(num_processes >= 1, names["num_processes"], f"must be >= 1, got {num_processes}")
    if process_id is not None:
        check(process_id >= 0, names["process_id"], f"must be >= 0, got {process_id}")
        if num_processes is not None:
            check(
                process_id < num_processes,
                names["process_id"],
                f"must be < {names['num_processes']} {num_processes}, got {process_id}",
            )
    if auto:
        return True
    missing = [k for k, v in given.items() if v is None]
    if len(missing) == len(given):
        return False
    if missing:
        present = next(k for k, v in given.items() if v is not None)
        needs = " and ".join(names[k] for k in missing)
        raise ConfigError(f"{names[missing[0]]}: {names[present]} needs {needs} too")
    return True


def _cpu_only() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    return bool(platforms) and {p.strip() for p in platforms.split(",")} <= {"cpu", ""}


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    cpu_devices: int | None = None,
    timeout_s: int = 300,
) -> bool:
    """Joins this process to a JAX world of several; must run before any JAX computation.

    Args:
      coordinator: ``HOST:PORT`` of process 0's coordinator service (the same for all).
      num_processes: the number of processes.
      process_id: this process, in ``[0, num_processes)``.
      auto: let ``jax.distributed.initialize`` detect Cloud TPU / SLURM / Open MPI / k8s
        (the three above, when given, override what it detects).
      cpu_devices: simulated CPU devices of this process (``jax_num_cpu_devices``; the
        processes' collectives then go through gloo, as with ``JAX_PLATFORMS=cpu``).
      timeout_s: how long to wait for the other processes to join.

    Returns:
      Whether ``jax.distributed.initialize`` was called (False: nothing asked for several
      processes, and JAX is left as it was).

    Raises:
      ConfigError: a bad combination of options (one line naming the option).
    """
    distributed = check_options(
        coordinator, num_processes, process_id, auto=auto, cpu_devices=cpu_devices
    )
    if not distributed:
        return False
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if cpu_devices or _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
    )
    return True


def gather_json(value: Any) -> list[Any]:
    """Every process's JSON-able ``value``, in process order. A collective: all must call."""
    if jax.process_count() == 1:
        return [value]
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int32)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: raw.size] = raw
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(rows[i, : sizes[i]]).decode()) for i in range(len(sizes))]


def fewest(n: int) -> int:
    """The smallest ``n`` of all processes (e.g. batches every one of them has). A collective."""
    if jax.process_count() == 1:
        return n
    return int(multihost_utils.process_allgather(np.array([n], np.int32)).min())


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (the same answer on all). A collective."""
    if jax.process_count() == 1:
        return flag
    return fewest(0 if flag else 1) == 0
