"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import sys
import time

import jax
from etils import epath

from mlgen import runs, sharding
from mlgen.bench.profile import format_split, op_split
from mlgen.config import Config
from mlgen.train.step import make_train_step


def median_time(fn, *, steps: int, warmup: int) -> float:
    """Median wall time of ``fn()`` (which must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def time_train_step(
    cfg: Config,
    host_batch: dict,
    *,
    steps: int,
    warmup: int,
    profile_dir: str | None = None,
) -> tuple[float, int]:
    """Median seconds of the real train step of ``cfg`` on one fixed host batch,
    and the param count.

    The step is what ``mlgen train`` runs: config -> sharded init -> ``make_train_step`` ->
    jit with donation, so a benchmark measures the framework, not a copy of it.
    ``profile_dir``: after timing, trace ``steps`` more steps there and print where their time
    went, op by op (:mod:`mlgen.bench.profile`), to stderr.
    """
    s = runs.setup(cfg.validate())
    step = make_train_step(s.task.make_loss(s.graphdef), s.optimizer)
    holder = {"state": s.state}
    with sharding.use(s.mesh, s.rules):
        batch = sharding.put_batch(host_batch, s.mesh, s.task.batch_axes, s.rules)
        jstep = jax.jit(step, out_shardings=(s.state_shardings, None), donate_argnums=(0,))
        key = jax.random.key(0)

        def one():
            holder["state"], m = jstep(holder["state"], batch, key)
            m["loss"].block_until_ready()

        med = median_time(one, steps=steps, warmup=warmup)
        if profile_dir is not None:
            hlo = jstep.lower(holder["state"], batch, key).compile().as_text()
            out = epath.Path(profile_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "step.hlo.txt").write_text(hlo)
            with jax.profiler.trace(str(out)):
                for _ in range(steps):
                    one()
            print(format_split(op_split(hlo, str(out), steps)), file=sys.stderr)
    return med, int(sum(x.size for x in jax.tree.leaves(holder["state"]["params"])))
