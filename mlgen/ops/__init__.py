"""Pure array functions (no parameters, no Flax)."""

from mlgen.ops.attention import attention

__all__ = ["attention"]
