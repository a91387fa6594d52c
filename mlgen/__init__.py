"""mlgen: train and sample generative models (LMs, diffusion) through one sharded optax loop.

The curated public API::

    import mlgen
    result = mlgen.train("configs/lm/tiny.py", ["workdir=/tmp/tiny", "train.num_steps=100"])
    run = mlgen.restore("/tmp/tiny")          # a trained run, onto the current devices
    mlgen.ops.attention(q, k, v, causal=True)  # every attention backend behind one call

Importing mlgen registers the built-in model families (``mlgen.models``) and tasks
(``mlgen.tasks``) by name.
"""

from mlgen import config, ops, sharding
from mlgen.config import (
    Config,
    ConfigError,
    MeshConfig,
    OptimConfig,
    PrecisionConfig,
    TrainConfig,
    register,
)
from mlgen.ops.attention import AttentionConfig
from mlgen.runs import restore, setup, train  # noqa: F811  (the function shadows the subpackage)
from mlgen.train.step import make_train_step
from mlgen.train.trainer import TrainResult

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "Config",
    "ConfigError",
    "MeshConfig",
    "OptimConfig",
    "PrecisionConfig",
    "TrainConfig",
    "TrainResult",
    "config",
    "make_train_step",
    "ops",
    "register",
    "restore",
    "setup",
    "sharding",
    "train",
]
