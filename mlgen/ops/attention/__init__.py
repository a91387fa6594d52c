from mlgen.ops.attention.api import attention

__all__ = ["attention"]
