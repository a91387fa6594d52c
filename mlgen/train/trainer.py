"""The one training loop: data -> step -> metrics -> checkpoint -> eval / hooks.

``fit(prepare(config, mesh, rules, task))`` trains any built :class:`~mlgen.train.task.Task`:
the train state is created already sharded (``mlgen.sharding.sharded_init``), the step is
jitted once with donation, metrics go to a progress bar, TensorBoard (``WORKDIR/tb``) and
``WORKDIR/metrics.jsonl`` (with throughput over each logging interval, the compiling first
step left out: ``step_s``, ``examples_per_s``, ``tokens_per_s``, ``model_flops_per_s`` and
``mfu`` against ``mlgen.train.throughput.peak_flops`` of the mesh's devices), and checkpoints
(state, EMA, data-iterator state, config) go to ``WORKDIR/checkpoints``. Running the same run
again resumes from the latest checkpoint. The trainer looks nothing up by name: ``mlgen.train``
(``mlgen/runs.py``) builds the task.

It never loses work:

- **Preemption.** SIGTERM or SIGINT (:mod:`mlgen.train.preemption`) finishes the current step,
  saves a checkpoint synchronously (data-iterator state included), logs one line and returns a
  :class:`TrainResult` with ``preempted=True`` (``mlgen train`` exits 0); rerunning resumes
  exactly there. A second signal exits at once; the previous checkpoint stays intact. On
  several processes all stop after the same step.
- **Divergence guard.** A step with a non-finite loss or gradient is skipped inside the
  compiled step (``mlgen.train.step.keep_if``; ``skipped`` in the metrics, counted per
  logging interval, and left out of the interval's other means). After ``train.max_bad_steps``
  in a row the run stops with :class:`~mlgen.train.errors.Diverged` naming the steps and the
  last good checkpoint. A state with a NaN or infinity in it is never checkpointed (checked at
  each save), so rotation never replaces good checkpoints with bad ones.
- **Checkpoints you can trust.** Resuming takes the newest checkpoint that reads, validates
  (finite) and fits the config (``Checkpointer.restore_good``); an unreadable one is one line
  and is moved to ``checkpoints/corrupt/``. A failed save is one line; a lost final one is a
  :class:`~mlgen.train.errors.CheckpointWriteError`. A failing hook is one warning line and
  runs after the step's checkpoint is saved.
- **One trainer per workdir** (:mod:`mlgen.train.lock`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from mlgen import config as config_lib
from mlgen import distributed, sharding
from mlgen.ops.attention import describe, recording
from mlgen.train.checkpoint import Checkpointer, one_line, workdir_path
from mlgen.train.errors import CheckpointWriteError, Diverged
from mlgen.train.events import EventWriter
from mlgen.train.lock import WorkdirLock
from mlgen.train.optim import make_optimizer
from mlgen.train.preemption import Preemption
from mlgen.train.step import default_step, make_eval_step
from mlgen.train.task import Task, TrainStep
from mlgen.train.throughput import peak_flops

log = logging.getLogger("mlgen")


@dataclasses.dataclass
class TrainResult:
    """What training returns: the final state (sharded), its model graph, the logs.

    ``preempted``: the run stopped early on SIGTERM / SIGINT, after saving a checkpoint of the
    state it returns (``final_metrics["step"]``); training it again resumes there.
    """

    state: dict
    graphdef: nnx.GraphDef
    config: config_lib.Config
    mesh: Mesh
    history: list[dict]
    rules: sharding.Rules = ()  # the logical -> mesh rules it ran under (for ``sharding.use``)
    attention: str = ""  # the attention backends the step compiled to (``ops.attention.describe``)
    preempted: bool = False

    @property
    def final_metrics(self) -> dict:
        return self.history[-1] if self.history else {}

    def model(self, *, ema: bool = True) -> nnx.Module:
        params = self.state["ema"] if ema and "ema" in self.state else self.state["params"]
        model_state = self.state.get("model_state")
        return (
            nnx.merge(self.graphdef, params, model_state)
            if model_state
            else nnx.merge(self.graphdef, params)
        )


@dataclasses.dataclass
class Setup:
    """A run's mesh, rules, task, train step and (sharded or abstract) state."""

    config: config_lib.Config
    mesh: Mesh
    rules: sharding.Rules
    task: Task
    graphdef: nnx.GraphDef
    state: dict
    state_shardings: Any
    train_step: TrainStep
    optimizer: optax.GradientTransformation
    schedule: Any


def prepare(
    cfg: config_lib.Config, mesh: Mesh, rules: sharding.Rules, task: Task, *, abstract: bool = False
) -> Setup:
    """The optimizer and train step of ``task`` and its train state, sharded
    (abstract: shapes only)."""
    tx, sched = make_optimizer(cfg.optim, cfg.train.num_steps, state_dtype=cfg.precision.optimizer)
    tc = cfg.train
    train_step = task.train_step or default_step(
        task.make_loss,
        tx,
        grad_accum_steps=cfg.optim.grad_accum_steps,
        lr_schedule=sched,
        ema_decay=tc.ema_decay,
        ema_warmup=tc.ema_warmup,
        trainable=task.trainable,
    )
    with sharding.use(mesh, rules):
        graphdef, state, shardings = sharding.sharded_init(
            task.make_model,
            mesh,
            init=train_step.init,
            init_shardings=lambda a, p, s: train_step.shardings(a, p, s, mesh),
            abstract=abstract,
        )
    return Setup(cfg, mesh, rules, task, graphdef, state, shardings, train_step, tx, sched)


def jit_step(s: Setup):
    """The jitted train step ``(state, batch, rng) -> (state, metrics)``, state donated: what
    ``fit`` runs and ``mlgen plan`` compiles ahead of time. Call under ``sharding.use``."""
    return jax.jit(
        s.train_step.make(s.graphdef),
        out_shardings=(s.state_shardings, None),
        donate_argnums=(0,),
    )


class _Logger:
    """metrics.jsonl + TensorBoard + progress bar; only process 0 writes.

    A local metrics file is appended to line by line. Remote files (``gs://``) cannot be
    appended to, so the lines are kept and the whole file is rewritten at most every
    ``remote_flush_s`` seconds and at the end.
    """

    def __init__(
        self,
        workdir: epath.Path,
        start: int,
        total: int,
        progress: bool,
        remote_flush_s: float = 30.0,
    ):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.remote = "://" in str(workdir)
        self.flush_s, self.flushed = remote_flush_s, time.monotonic()
        self.lines: list[str] = []
        self.writer = self.bar = None
        if not self.enabled:
            return
        if (
            self.path.exists()
        ):  # drop lines past the restored step (written after the last checkpoint)
            self.lines = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= start
            ]
            self._rewrite()
        self.writer = EventWriter(workdir / "tb")  # a remote one is rewritten when jsonl is
        if progress:
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def _rewrite(self) -> None:
        self.path.write_text("".join(ln + "\n" for ln in self.lines))
        self.flushed = time.monotonic()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        line = json.dumps(record)
        self.lines.append(line)
        due = not self.remote or time.monotonic() - self.flushed > self.flush_s
        if not self.remote:
            with self.path.open("a") as f:
                f.write(line + "\n")
        elif due:
            self._rewrite()
        for k, v in record.items():
            if k != "step" and math.isfinite(v):  # a skipped step's NaN: metrics.jsonl only
                self.writer.scalar(k, v, step)
        if due:
            self.writer.flush()
        if self.bar is not None:
            shown = {
                k: f"{v:.4g}"
                for k, v in record.items()
                if k in ("loss", "eval_loss", "lr", "tokens_per_s", "model_flops_per_s", "mfu")
            }
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.enabled and self.remote:
            self._rewrite()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _mean_metrics(items: list[dict]) -> dict[str, float]:
    """Means over the steps; with a ``skipped`` metric, over the steps that were not skipped
    (all, if every one was), and ``skipped`` their number."""
    host = jax.device_get(items)
    kept = [m for m in host if not m.get("skipped", 0)] or host
    out = {k: float(np.mean([m[k] for m in kept])) for k in host[0]}
    if "skipped" in out:
        out["skipped"] = float(sum(m["skipped"] for m in host))
    return out


@jax.jit
def _finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def all_finite(tree) -> bool:
    """Whether every floating-point array of ``tree`` is finite (one reduction, compiled)."""
    return bool(_finite(tree))


class _Streak:
    """Consecutive skipped steps. A step's flag is read once the next step is queued (no wait
    on the step just started), or at once by :meth:`flush` (checkpoints, the end)."""

    def __init__(self):
        self.count = self.first = self.last = 0
        self._unread: tuple[int, Any] | None = None

    def push(self, done: int, metrics: dict) -> None:
        prev, self._unread = self._unread, (done, metrics.get("skipped"))
        self._read(prev)

    def flush(self) -> None:
        prev, self._unread = self._unread, None
        self._read(prev)

    def _read(self, item) -> None:
        if item is None or item[1] is None:  # a task's own step may not report ``skipped``
            return
        done, flag = item
        if float(flag) > 0:
            self.first = self.first if self.count else done
            self.count, self.last = self.count + 1, done
        else:
            self.count = 0


def _run_hooks(s: Setup, done: int, state: dict, workdir) -> None:
    """Each hook; one that raises is one warning line (the run and its checkpoints go on)."""
    for hook in s.task.hooks:
        try:
            hook(done, state, s.graphdef, workdir)
        except Exception as e:  # noqa: BLE001  (a plot or a sample grid never stops training)
            name = getattr(hook, "__name__", type(hook).__name__)
            log.warning("hook %s failed at step %d (%s); training goes on", name, done, one_line(e))


def _throughput(
    task: Task, steps: int, seconds: float, examples_per_step: int, peak: float
) -> dict[str, float]:
    """Step time, examples/s, tokens/s, model FLOP/s and MFU of ``steps`` steps in ``seconds``."""
    out = {"step_s": seconds / steps, "examples_per_s": examples_per_step * steps / seconds}
    if task.tokens_per_example:
        out["tokens_per_s"] = out["examples_per_s"] * task.tokens_per_example
    if task.flops_per_example:
        out["model_flops_per_s"] = out["examples_per_s"] * task.flops_per_example
        if peak:
            out["mfu"] = out["model_flops_per_s"] / peak
    return out


def evaluate(s: Setup, state: dict, eval_fn, steps: int) -> dict[str, float]:
    """Mean metrics over ``steps`` validation batches (a fresh pass each time),
    ``eval_`` prefixed."""
    if s.task.eval_data is None or steps == 0:
        return {}
    batches = s.task.eval_data()
    if jax.process_count() > 1:  # each step is a collective: all run as many as the shortest pass
        batches = [b for _, b in zip(range(steps), batches)]
        steps = distributed.fewest(len(batches))
    out = []
    for i, batch in enumerate(batches):
        if i >= steps:
            break
        out.append(
            eval_fn(
                state["params"],
                state["model_state"],
                sharding.put_batch(batch, s.mesh, s.task.batch_axes, s.rules),
                jax.random.key(i),
            )
        )
    if not out:
        return {}
    return {f"eval_{k}": v for k, v in _mean_metrics(out).items()}


def fit(s: Setup) -> TrainResult:
    """Trains (or resumes) the run ``s`` describes, to ``train.num_steps`` (or a signal).

    Raises:
      WorkdirLocked: another live trainer holds the workdir.
      CheckpointMismatch: the latest checkpoint does not fit this config (a model field
        changed).
      Diverged: ``train.max_bad_steps`` non-finite steps in a row, or a non-finite state.
      CheckpointWriteError: the final (or the preemption) checkpoint could not be written.
    """
    workdir = workdir_path(s.config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with WorkdirLock(workdir), Preemption() as preemption:
        return _fit(s, workdir, preemption)


def _fit(s: Setup, workdir: epath.Path, preemption: Preemption) -> TrainResult:
    cfg, tc = s.config, s.config.train
    ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints, async_save=tc.async_checkpoints)
    logger = None
    try:
        data = s.task.train_data()
        state, start = s.state, 0
        found = ckpt.restore_good(
            sharding.abstract_like(state, s.state_shardings), config=cfg, valid=all_finite
        )
        if found is not None:
            start, state, data_state = found
            if data_state is not None:
                data.set_state(data_state)
        if jax.process_index() == 0:
            config_lib.save_json(cfg, workdir / "config.json")

        eval_loss = (s.task.make_eval_loss or s.task.make_loss)(s.graphdef)
        base_rng = jax.random.key(cfg.seed)
        history: list[dict] = []
        logger = _Logger(workdir, start, tc.num_steps, tc.progress_bar)
        attention = ""
        peak = 0.0
        if s.task.flops_per_example:  # MFU's denominator: every device of the run
            peak, peak_source = peak_flops(list(s.mesh.devices.flat))
            log.info("peak %.4g FLOP/s for MFU: %s", peak, peak_source)
        streak, stopped = _Streak(), False
        with sharding.use(s.mesh, s.rules):
            jstep = jit_step(s)
            jeval = jax.jit(make_eval_step(eval_loss))
            pending: list[dict] = []
            # steps_since: steps since the last log; timed: those of them after the run's first
            # step (it compiles), over which throughput is measured from t_last.
            t_last, steps_since, timed = time.perf_counter(), 0, 0
            examples_per_step = None
            for step in range(start, tc.num_steps):
                host_batch = next(data)
                if examples_per_step is None:
                    examples_per_step = len(next(iter(host_batch.values()))) * jax.process_count()
                batch = sharding.put_batch(host_batch, s.mesh, s.task.batch_axes, s.rules)
                if step == start:  # the first call traces the step: say once which attention runs
                    with recording() as calls:
                        state, metrics = jstep(state, batch, base_rng)
                    attention = describe(calls)
                    log.info(
                        "%s on mesh %s: attention %s",
                        s.task.name or cfg.task,
                        dict(s.mesh.shape),
                        attention,
                    )
                    jax.block_until_ready(metrics)
                    t_last = time.perf_counter()
                else:
                    state, metrics = jstep(state, batch, base_rng)
                    timed += 1
                pending.append(metrics)
                steps_since += 1
                done = step + 1
                is_last = done == tc.num_steps
                stopped = preemption.requested(done, is_last, tc.preemption_sync_every)
                is_log = done % tc.log_every == 0 or is_last or stopped
                is_ckpt = done % tc.checkpoint_every == 0 or is_last or stopped
                streak.push(done, metrics)
                if is_ckpt and streak.count < tc.max_bad_steps:
                    streak.flush()
                if streak.count >= tc.max_bad_steps:
                    raise _diverged(streak, done, tc.max_bad_steps, ckpt)
                ckpt.poll()
                if is_log:
                    record = _mean_metrics(pending)
                    if timed:  # an interval of only the compiling first step has no throughput
                        record.update(
                            _throughput(
                                s.task, timed, time.perf_counter() - t_last, examples_per_step, peak
                            )
                        )
                    is_eval = not stopped and (
                        (tc.eval_every and done % tc.eval_every == 0) or is_last
                    )
                    if is_eval:
                        record.update(evaluate(s, state, jeval, tc.eval_steps))
                    history.append({"step": done, **record})
                    logger.log(done, record)
                    logger.advance(steps_since)
                    pending, steps_since, timed, t_last = [], 0, 0, time.perf_counter()
                else:
                    is_eval = False
                if is_ckpt:
                    _save(ckpt, done, state, cfg, data, force=is_last or stopped, sync=stopped)
                if is_eval:  # after the checkpoint: a failing hook never costs it
                    _run_hooks(s, done, state, workdir)
                if stopped:
                    _say_preempted(ckpt, preemption, done)
                    break
        ckpt.close()
        last = tc.num_steps if not stopped else done
        if last in ckpt.failed:
            latest = ckpt.latest_step()
            raise CheckpointWriteError(
                f"checkpoint: step {last} was not written ({ckpt.failed[last]}); the latest "
                f"complete checkpoint is {'none' if latest is None else f'step {latest}'} in "
                f"{ckpt.directory}"
            )
    finally:
        ckpt.close()
        if logger is not None:
            logger.close()
    return TrainResult(
        state, s.graphdef, cfg, s.mesh, history, s.rules, attention, preempted=stopped
    )


def _save(ckpt: Checkpointer, done: int, state, cfg, data, *, force: bool, sync: bool) -> None:
    """Checkpoints ``state`` unless it holds a NaN or infinity (then the run stops)."""
    if not all_finite(state):
        ckpt.wait()
        latest = ckpt.latest_step()
        raise Diverged(
            f"train: the train state is not finite after step {done} (not checkpointed); the "
            f"last good checkpoint is {'none' if latest is None else f'step {latest}'} in "
            f"{ckpt.directory} (lower optim.lr?)"
        )
    ckpt.save(done, state, config=cfg, data_state=data.get_state(), force=force)
    if sync:
        ckpt.wait()


def _diverged(streak: _Streak, done: int, limit: int, ckpt: Checkpointer) -> Diverged:
    ckpt.wait()
    latest = ckpt.latest_step()
    good = (
        f"the last good checkpoint is step {latest} in {ckpt.directory}"
        if latest is not None
        else "no checkpoint was written"
    )
    if latest is not None and latest >= streak.first:  # saved during the streak: state kept
        good += f" (the parameters after step {streak.first - 1})"
    return Diverged(
        f"train.max_bad_steps: {streak.count} steps in a row (steps {streak.first}-{streak.last}) "
        f"had a non-finite loss or gradient and were skipped (limit {limit}); stopped after "
        f"step {done}; {good} (lower optim.lr, or raise train.max_bad_steps)"
    )


def _say_preempted(ckpt: Checkpointer, preemption: Preemption, done: int) -> None:
    if done in ckpt.failed:
        latest = ckpt.latest_step()
        raise CheckpointWriteError(
            f"checkpoint: {preemption.name} at step {done}, but its checkpoint was not written "
            f"({ckpt.failed[done]}); the latest complete checkpoint is "
            f"{'none' if latest is None else f'step {latest}'} in {ckpt.directory}"
        )
    log.warning(
        "%s: stopped after step %d and saved it in %s; run the same command again to resume",
        preemption.name,
        done,
        ckpt.directory,
    )


def restore_state(s: Setup, step: int | None = None) -> TrainResult:
    """The checkpointed state of ``s.config.workdir`` (latest readable, or ``step``) onto
    ``s``'s shardings. An unreadable checkpoint is one line and the next older one is used
    (left in place: only a trainer moves checkpoints aside).

    ``s`` is an abstract :func:`prepare` (its state holds the target shapes and shardings).
    """
    ckpt = Checkpointer(s.config.workdir, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"restore: no checkpoint under {ckpt.directory}")
        if step is not None:
            state, _ = ckpt.restore(s.state, step, with_data=False)
        else:
            found = ckpt.restore_good(s.state, with_data=False, set_aside=False)
            if found is None:
                raise FileNotFoundError(f"restore: no readable checkpoint under {ckpt.directory}")
            state = found[1]
    finally:
        ckpt.close()
    return TrainResult(state, s.graphdef, s.config, s.mesh, [], s.rules)


def saved_config(workdir: str, step: int | None = None) -> config_lib.Config:
    """The config a run's checkpoint (latest readable, or ``step``) was saved with."""
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        steps = sorted(ckpt.manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"restore: no checkpoint under {ckpt.directory}")
        for each in steps:
            try:
                return ckpt.restore_config(each)
            except config_lib.ConfigError:
                raise
            except Exception as e:  # noqa: BLE001  (an unreadable checkpoint: the next older)
                if step is not None or each == steps[-1]:
                    raise
                log.warning("checkpoint %d: its config is unreadable (%s)", each, one_line(e))
    finally:
        ckpt.close()
