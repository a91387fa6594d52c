"""Pure array functions (no parameters, no Flax): attention backends, ring attention, losses."""

from mlgen.ops.attention import attention
from mlgen.ops.attention.ring import ring_attention
from mlgen.ops.losses import cross_entropy

__all__ = ["attention", "cross_entropy", "ring_attention"]
