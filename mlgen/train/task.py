"""What the one trainer needs from any objective: a model, a loss, data and hooks.

A task builder (``mlgen/tasks/*.py``) turns a Config into a :class:`Task`; the trainer
(``mlgen/train/trainer.py``) knows nothing else about what it trains.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Protocol

from flax import nnx

from mlgen.typing import Batch, Metrics, Params


class LossFn(Protocol):
    def __call__(self, params: Params, batch: Batch, rng) -> tuple[Any, Metrics]: ...


class DataIterator(Protocol):
    """A grain ``DatasetIterator`` (or anything alike): host-local numpy batches, resumable."""

    def __next__(self) -> Batch: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """Everything task-specific, as plain callables.

    Attributes:
      make_model: ``() -> nnx.Module``; called under the mesh and logical-axis rules
        (``mlgen.sharding.use``), under ``nnx.eval_shape`` and under ``jit``.
      make_loss: ``(graphdef) -> loss(params, batch, rng) -> (loss, metrics)`` for training.
      make_eval_loss: same signature, deterministic (no dropout); None = use make_loss.
      train_data: ``() -> DataIterator`` of this host's share of each global batch.
      eval_data: ``() -> Iterator[Batch]``, a fresh pass over validation batches, or None.
      batch_axes: logical axis names per batch key (default: leading dim over ``batch``).
      hooks: ``hook(step, params, ema_params, graphdef, workdir)`` called at each eval and at the
        end (sample grids, plots, generations).
      tokens_per_example: for the tokens/s metric (0: report examples/s only).
    """

    make_model: Callable[[], nnx.Module]
    make_loss: Callable[[nnx.GraphDef], LossFn]
    make_eval_loss: Callable[[nnx.GraphDef], LossFn] | None = None
    train_data: Callable[[], DataIterator]
    eval_data: Callable[[], Iterator[Batch]] | None = None
    batch_axes: dict[str, tuple] = dataclasses.field(default_factory=dict)
    hooks: tuple[Callable[..., None], ...] = ()
    tokens_per_example: int = 0


def check_batch(batch_size: int, grad_accum_steps: int, mesh: dict[str, int]) -> None:
    """Config checks every task shares: the global batch splits over the data axes, the
    gradient-accumulation micro-batches, and the processes (each host loads its share)."""
    import jax

    from mlgen.config import check

    shards = mesh["data"] * mesh["fsdp"]
    check(batch_size % shards == 0, "data.batch_size",
          f"{batch_size} is not divisible by the data axes (data*fsdp = {shards})")
    check(batch_size % (grad_accum_steps * shards) == 0, "optim.grad_accum_steps",
          f"{grad_accum_steps} micro-batches of data.batch_size={batch_size} do not split evenly over the data axes "
          f"({shards})")
    check(batch_size % jax.process_count() == 0, "data.batch_size",
          f"{batch_size} is not divisible by the process count {jax.process_count()}")
