"""Attention: one entry point, several backends (see ``api.BACKENDS``)."""

from mlgen.ops.attention.api import BACKENDS, Backend, Problem, attention, auto_order
from mlgen.ops.attention.block_sizes import BlockSizes

__all__ = ["BACKENDS", "Backend", "BlockSizes", "Problem", "attention", "auto_order"]
