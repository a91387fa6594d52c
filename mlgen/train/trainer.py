"""The one training loop: data -> step -> metrics -> checkpoint -> eval / hooks.

``train(config)`` runs any task (``mlgen.tasks``) on the mesh from its config: parameters and
optimizer state are created already sharded, the step is jitted once with donation, metrics
go to a progress bar, TensorBoard (``WORKDIR/tb``) and ``WORKDIR/metrics.jsonl``, and
checkpoints (state, EMA, data-iterator state, config) go to ``WORKDIR/checkpoints``. Running
the same command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlgen import config as config_lib
from mlgen import sharding, tasks
from mlgen.train.checkpoint import Checkpointer, abstract_like
from mlgen.train.optim import make_optimizer
from mlgen.train.step import init_state, make_eval_step, make_train_step
from mlgen.train.task import Task


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns: the final state (sharded), its model graph, and the logs."""

    state: dict
    graphdef: nnx.GraphDef
    config: config_lib.Config
    mesh: Mesh
    history: list[dict]

    @property
    def final_metrics(self) -> dict:
        return self.history[-1] if self.history else {}

    def model(self, *, ema: bool = True) -> nnx.Module:
        params = self.state["ema"] if ema and "ema" in self.state else self.state["params"]
        return nnx.merge(self.graphdef, params)


@dataclasses.dataclass
class Setup:
    """A run's mesh, task, optimizer and (sharded) state, shared by training and restoring."""

    config: config_lib.Config
    mesh: Mesh
    task: Task
    graphdef: nnx.GraphDef
    state: dict
    state_shardings: Any
    optimizer: optax.GradientTransformation
    schedule: Any


def setup(cfg: config_lib.Config, *, devices: list | None = None, abstract: bool = False) -> Setup:
    """Builds mesh, task and sharded train state (abstract: ShapeDtypeStructs only)."""
    devices = list(jax.devices() if devices is None else devices)
    cfg.validate(len(devices))
    mesh = sharding.make_mesh(cfg.mesh, devices)
    task = tasks.get(cfg.task).build(cfg, mesh)
    tx, sched = make_optimizer(cfg.optim, cfg.train.num_steps)
    ema = cfg.train.ema_decay > 0
    with sharding.use(mesh, cfg.mesh.rules):
        abs_model = nnx.eval_shape(task.make_model)
        graphdef, abs_params = nnx.split(abs_model, nnx.Param)
        abs_params_dict = nnx.to_pure_dict(abs_params)
        param_sh = sharding.fit_shardings(abs_params_dict, nnx.to_pure_dict(nnx.get_named_sharding(abs_params, mesh)))
        abs_params = abs_params_dict
        replicated = NamedSharding(mesh, P())
        abs_state = jax.eval_shape(lambda p: init_state(p, tx, ema=ema), abs_params)
        state_sh = {
            "step": replicated,
            "params": param_sh,
            "opt_state": optax.tree_map_params(tx, lambda _, s: s, abs_state["opt_state"], param_sh,
                                               transform_non_params=lambda _: replicated),
        }
        if ema:
            state_sh["ema"] = param_sh
        if abstract:
            state = abstract_like(abs_state, state_sh)
        else:
            def make_state():
                params = nnx.to_pure_dict(nnx.split(task.make_model(), nnx.Param)[1])
                return init_state(params, tx, ema=ema)

            state = jax.jit(make_state, out_shardings=state_sh)()
    return Setup(cfg, mesh, task, graphdef, state, state_sh, tx, sched)


class _Logger:
    """metrics.jsonl + TensorBoard + progress bar; only process 0 writes."""

    def __init__(self, workdir: Path, start: int, total: int, progress: bool):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        if self.path.exists():  # drop lines past the restored step (written after the last checkpoint)
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
            self.path.write_text("".join(ln + "\n" for ln in lines))
        try:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tb"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.writer = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step":
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "eval_loss", "lr", "tokens_per_s")}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _mean_metrics(items: list[dict]) -> dict[str, float]:
    host = jax.device_get(items)
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def evaluate(s: Setup, params, eval_fn, steps: int) -> dict[str, float]:
    """Mean metrics over ``steps`` validation batches (a fresh pass each time), ``eval_`` prefixed."""
    if s.task.eval_data is None or steps == 0:
        return {}
    out = []
    for i, batch in enumerate(s.task.eval_data()):
        if i >= steps:
            break
        out.append(eval_fn(params, sharding.put_batch(batch, s.mesh, s.task.batch_axes, s.config.mesh.rules),
                           jax.random.key(i)))
    if not out:
        return {}
    return {f"eval_{k}": v for k, v in _mean_metrics(out).items()}


def train(config: config_lib.Config | str | Path, overrides: Iterable[str] = (), *,
          devices: list | None = None) -> TrainResult:
    """Trains (or resumes) the run described by ``config`` (a Config or a config file path).

    Example (a notebook)::

        import mlgen
        result = mlgen.train("configs/lm/tiny.py", ["workdir=/tmp/tiny", "train.num_steps=100"])
        print(result.final_metrics["eval_loss"])
    """
    cfg = config_lib.load(config, overrides)
    s = setup(cfg, devices=devices)
    tc = cfg.train
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints, async_save=tc.async_checkpoints)
    data = s.task.train_data()
    state = s.state
    start = ckpt.latest_step() or 0
    if start:
        state, data_state = ckpt.restore(abstract_like(state, s.state_shardings))
        if data_state is not None:
            data.set_state(data_state)
    config_lib.save_json(cfg, workdir / "config.json")

    step_fn = make_train_step(s.task.make_loss(s.graphdef), s.optimizer, grad_accum_steps=cfg.optim.grad_accum_steps,
                              lr_schedule=s.schedule, ema_decay=tc.ema_decay, ema_warmup=tc.ema_warmup)
    eval_loss = (s.task.make_eval_loss or s.task.make_loss)(s.graphdef)
    base_rng = jax.random.key(cfg.seed)
    history: list[dict] = []
    log = _Logger(workdir, start, tc.num_steps, tc.progress_bar)
    with sharding.use(s.mesh, cfg.mesh.rules):
        jstep = jax.jit(step_fn, out_shardings=(s.state_shardings, None), donate_argnums=(0,))
        jeval = jax.jit(make_eval_step(eval_loss))
        pending: list[dict] = []
        t_last, steps_since = time.perf_counter(), 0
        examples_per_step = None
        for step in range(start, tc.num_steps):
            host_batch = next(data)
            if examples_per_step is None:
                examples_per_step = len(next(iter(host_batch.values()))) * jax.process_count()
            batch = sharding.put_batch(host_batch, s.mesh, s.task.batch_axes, cfg.mesh.rules)
            state, metrics = jstep(state, batch, base_rng)
            pending.append(metrics)
            steps_since += 1
            done = step + 1
            is_last = done == tc.num_steps
            if done % tc.log_every == 0 or is_last:
                record = _mean_metrics(pending)
                elapsed = time.perf_counter() - t_last
                record["step_s"] = elapsed / steps_since
                record["examples_per_s"] = examples_per_step * steps_since / elapsed
                if s.task.tokens_per_example:
                    record["tokens_per_s"] = record["examples_per_s"] * s.task.tokens_per_example
                is_eval = (tc.eval_every and done % tc.eval_every == 0) or is_last
                if is_eval:
                    record.update(evaluate(s, state["params"], jeval, tc.eval_steps))
                history.append({"step": done, **record})
                log.log(done, record)
                log.advance(steps_since)
                if is_eval:  # after logging, so hooks (the loss plot) see this step's metrics
                    _run_hooks(s, state, done, workdir)
                pending, steps_since, t_last = [], 0, time.perf_counter()
            if done % tc.checkpoint_every == 0 or is_last:
                ckpt.save(done, state, config=cfg, data_state=data.get_state(), force=is_last)
        ckpt.close()
    log.close()
    return TrainResult(state, s.graphdef, cfg, s.mesh, history)


def _run_hooks(s: Setup, state: dict, step: int, workdir: Path) -> None:
    for hook in s.task.hooks:
        hook(step, state["params"], state.get("ema"), s.graphdef, str(workdir))


def restore(workdir: str | Path, overrides: Iterable[str] = (), *, devices: list | None = None,
            step: int | None = None) -> TrainResult:
    """Loads a run's saved config and latest (or given) checkpoint, onto the current devices.

    ``overrides`` change the saved config (e.g. ``mesh.data=4``) before restoring; the
    checkpoint's state is resharded onto the new mesh.
    """
    workdir = Path(workdir)
    ckpt = Checkpointer(workdir, async_save=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"restore: no checkpoint under {workdir / 'checkpoints'}")
    cfg = ckpt.restore_config(step)
    cfg = dataclasses.replace(cfg, workdir=str(workdir))
    cfg = config_lib.load(cfg, overrides)
    s = setup(cfg, devices=devices, abstract=True)
    state, _ = ckpt.restore(s.state, step, with_data=False)
    ckpt.close()
    return TrainResult(state, s.graphdef, cfg, s.mesh, [])
