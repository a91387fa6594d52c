"""Attention: one entry point, several backends (see ``api.BACKENDS``)."""

from mlgen.ops.attention.api import (
    BACKENDS,
    AttentionConfig,
    Backend,
    Problem,
    attention,
    auto_order,
    describe,
    recording,
)
from mlgen.ops.attention.block_sizes import BlockSizes

__all__ = [
    "BACKENDS",
    "AttentionConfig",
    "Backend",
    "BlockSizes",
    "Problem",
    "attention",
    "auto_order",
    "describe",
    "recording",
]
