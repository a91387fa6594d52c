"""What the one trainer needs from whatever it trains: a model, a loss, data and hooks.

A task builder (``mlgen.tasks``) turns a Config into a :class:`Task`; the trainer
(``mlgen/train/trainer.py``) takes it as given and knows nothing else about what it trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from flax import nnx

from mlgen.typing import Batch, Metrics, Params


class LossFn(Protocol):
    def __call__(
        self, params: Params, model_state: Any, batch: Batch, rng
    ) -> tuple[Any, tuple[Metrics, Any]]:
        """``(loss, (metrics, new model_state))``; ``model_state`` holds the non-parameter
        variables."""


class DataIterator(Protocol):
    """A grain ``DatasetIterator`` (or anything alike): host-local numpy batches, resumable."""

    def __next__(self) -> Batch: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


class Hook(Protocol):
    def __call__(self, step: int, state: dict, graphdef: nnx.GraphDef, workdir: Any) -> None:
        """Called at each eval and at the end with the train state (``params``, ``model_state``,
        ``ema`` when kept, ...) and the workdir (an ``etils.epath.Path``; may be remote). Runs on
        every process (sampling is collective); only process 0 should write files."""


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """How a train state is built, sharded and updated (``mlgen.train.step.default_step``).

    A task with several optimizers (a GAN's two players) brings its own: the trainer only
    calls these three.

    Attributes:
      init: ``(params, model_state) -> state``: a dict with at least ``step``, ``params`` and
        ``model_state`` (pure pytrees; traced under ``jit`` and ``eval_shape``).
      shardings: ``(abstract state, param shardings, model_state shardings, mesh) -> the
        state's shardings``.
      make: ``graphdef -> step(state, batch, rng) -> (state, metrics)``, pure; ``rng`` is the
        run's base key (the step folds in its own step number).
    """

    init: Callable[[Any, Any], dict]
    shardings: Callable[[Any, Any, Any, Any], Any]
    make: Callable[[nnx.GraphDef], Callable[[dict, Batch, Any], tuple[dict, Metrics]]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """Everything task-specific, as plain values and callables.

    Attributes:
      name: for the startup log (``"lm / transformer"``).
      make_model: ``() -> nnx.Module``; called under the mesh and logical-axis rules
        (``mlgen.sharding.use``), under ``nnx.eval_shape`` and under ``jit``.
      make_loss: ``(graphdef) -> LossFn`` for training.
      make_eval_loss: same, deterministic (no dropout); None = use make_loss.
      train_data: ``() -> DataIterator`` of this host's share of each global batch.
      eval_data: ``() -> Iterator[Batch]``, a fresh pass over validation batches, or None.
      batch_axes: logical axis names per batch key (default: leading dim over ``batch``).
      hooks: :class:`Hook` s (sample grids, plots).
      tokens_per_example: for the tokens/s metric (0: report examples/s only).
      flops_per_example: model FLOPs of one example's forward + backward (by formula,
        ``mlgen.train.throughput``) for the model-FLOP/s and MFU metrics (0: report neither).
      train_step: the task's own :class:`TrainStep` (several optimizers); None = the one
        default step over ``make_loss`` with the config's optimizer.
      trainable: which parameters train, a predicate on a parameter's ``/``-joined path
        (``mlgen.models.family.Family.trainable``); None = all. The default step gives the
        others no gradient and no optimizer state; a task's own ``train_step`` must honour it.
      batch_spec: ``() -> {key: (global shape, dtype)}`` of one train batch, read from the
        config alone (no data, no tokenizer): what ``mlgen plan`` compiles the step for.
    """

    name: str = ""
    make_model: Callable[[], nnx.Module]
    make_loss: Callable[[nnx.GraphDef], LossFn]
    make_eval_loss: Callable[[nnx.GraphDef], LossFn] | None = None
    train_data: Callable[[], DataIterator]
    eval_data: Callable[[], Iterator[Batch]] | None = None
    batch_axes: dict[str, tuple] = dataclasses.field(default_factory=dict)
    hooks: tuple[Hook, ...] = ()
    tokens_per_example: int = 0
    flops_per_example: float = 0.0
    train_step: TrainStep | None = None
    trainable: Callable[[str], bool] | None = None
    batch_spec: Callable[[], dict[str, tuple[tuple[int, ...], Any]]] | None = None
