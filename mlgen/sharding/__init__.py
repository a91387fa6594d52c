"""Mesh construction, logical-axis rules and sharded placement."""

from mlgen.sharding.mesh import make_mesh
from mlgen.sharding.partition import (
    abstract_batch,
    abstract_like,
    batch_sharding,
    constrain,
    fit_shardings,
    put_batch,
    recording,
    resolve,
    sharded_init,
    spec,
    use,
)
from mlgen.sharding.rules import (
    PRESETS,
    Rules,
    axes,
    check_mesh_use,
    get_rules,
    register_axes,
    shards_of,
)

__all__ = [
    "PRESETS",
    "Rules",
    "abstract_batch",
    "abstract_like",
    "axes",
    "batch_sharding",
    "check_mesh_use",
    "constrain",
    "fit_shardings",
    "get_rules",
    "make_mesh",
    "put_batch",
    "recording",
    "register_axes",
    "resolve",
    "shards_of",
    "sharded_init",
    "spec",
    "use",
]
