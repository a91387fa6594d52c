"""mlgen: train and sample generative models (LMs, diffusion) through one sharded optax loop.

The curated public API::

    import mlgen
    result = mlgen.train("configs/lm/tiny.py", ["workdir=/tmp/tiny", "train.num_steps=100"])
    run = mlgen.restore("/tmp/tiny")          # a trained run, onto the current devices
    mlgen.ops.attention(q, k, v, causal=True)  # every attention backend behind one call
"""

from mlgen import config, ops, sharding
from mlgen.config import Config, ConfigError, MeshConfig, OptimConfig, TrainConfig
from mlgen.train.step import make_train_step
from mlgen.train.trainer import TrainResult, restore, train  # noqa: F811  (the function shadows the subpackage)

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "MeshConfig", "OptimConfig", "TrainConfig", "TrainResult", "config",
    "make_train_step", "ops", "restore", "sharding", "train",
]
