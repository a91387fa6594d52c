"""mlgen: train and sample generative models (LMs, diffusion) through one sharded optax loop.

The curated public API::

    import mlgen
    result = mlgen.train("configs/lm/tiny.py", ["workdir=/tmp/tiny", "train.num_steps=100"])
    run = mlgen.restore("/tmp/tiny")          # a trained run, onto the current devices
    mlgen.ops.attention(q, k, v, causal=True)  # every attention backend behind one call
    print(mlgen.plan("configs/lm/llama3_8b.py", topology="v5p:4x4x4").report())  # fits? how fast?
    cfg, model = mlgen.convert.import_hf("path/to/hf-model")  # Llama, Mistral, Qwen2, GPT-2

Importing mlgen registers the built-in model families (``mlgen.models``) and tasks
(``mlgen.tasks``) by name.
"""

from mlgen import config, convert, ops, sharding
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
from mlgen.planner import Plan, plan
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
    "Plan",
    "PrecisionConfig",
    "TrainConfig",
    "TrainResult",
    "config",
    "convert",
    "make_train_step",
    "ops",
    "plan",
    "register",
    "restore",
    "setup",
    "sharding",
    "train",
]
