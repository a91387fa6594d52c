"""Pure array functions (no parameters, no Flax): attention backends, ring attention, losses,
mixture-of-experts routing and dispatch (``mlgen.ops.moe``; sharded over a mesh, experts split
or not: ``mlgen.ops.moe_parallel``)."""

from mlgen.ops import moe, moe_parallel
from mlgen.ops.attention import attention
from mlgen.ops.attention.ring import ring_attention
from mlgen.ops.losses import cross_entropy

__all__ = ["attention", "cross_entropy", "moe", "moe_parallel", "ring_attention"]
