"""Benchmarks behind ``mlgen bench NAME``; each module has ``run(argv)`` and prints JSON lines."""

import importlib

BENCHES = {
    "train": "mlgen.bench.train",
    "generate": "mlgen.bench.generate",
    "attention": "mlgen.bench.attention",
    "ring": "mlgen.bench.ring",
    "diffusion": "mlgen.bench.diffusion",
}


def run(name: str, argv: list[str]) -> None:
    if name not in BENCHES:
        raise SystemExit(f"mlgen bench: unknown benchmark {name!r}; choose from {sorted(BENCHES)}")
    importlib.import_module(BENCHES[name]).run(argv)


def median_time(fn, *, steps: int, warmup: int) -> float:
    """Median wall time of ``fn()`` (which must block until its work is done)."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def time_train_step(cfg, host_batch: dict, *, steps: int, warmup: int) -> tuple[float, int]:
    """Median seconds of the real train step of ``cfg`` on one fixed host batch, and the param count.

    The step is what ``mlgen train`` runs: config -> sharded init -> ``make_train_step`` ->
    jit with donation, so a benchmark measures the framework, not a copy of it.
    """
    import jax

    from mlgen import sharding
    from mlgen.train.step import make_train_step
    from mlgen.train.trainer import setup

    s = setup(cfg.validate())
    step = make_train_step(s.task.make_loss(s.graphdef), s.optimizer)
    holder = {"state": s.state}
    with sharding.use(s.mesh, cfg.mesh.rules):
        batch = sharding.put_batch(host_batch, s.mesh, s.task.batch_axes, cfg.mesh.rules)
        jstep = jax.jit(step, out_shardings=(s.state_shardings, None), donate_argnums=(0,))
        key = jax.random.key(0)

        def one():
            holder["state"], m = jstep(holder["state"], batch, key)
            m["loss"].block_until_ready()

        med = median_time(one, steps=steps, warmup=warmup)
    return med, int(sum(x.size for x in jax.tree.leaves(holder["state"]["params"])))
