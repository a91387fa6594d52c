"""Mesh construction and logical-axis sharding."""

from mlgen.sharding.mesh import make_mesh
from mlgen.sharding.partition import batch_sharding, constrain, fit_shardings, put_batch, sharded_init, spec, use
from mlgen.sharding.rules import AXES, PRESETS, get_rules

__all__ = ["AXES", "PRESETS", "batch_sharding", "constrain", "fit_shardings", "get_rules", "make_mesh", "put_batch",
           "sharded_init", "spec", "use"]
