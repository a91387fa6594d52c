"""``attention(q, k, v, ...)``: the one entry point; dispatches to a backend."""

from __future__ import annotations

from mlgen.ops.attention import reference


def attention(q, k, v, *, causal: bool = False, segment_ids=None, sliding_window: int | None = None,
              scale: float | None = None, backend="auto", interpret: bool = False):
    """Multi-head attention, q ``[B, T, N, H]``, k/v ``[B, S, K, H]`` (N a multiple of K)."""
    return reference.attention(q, k, v, causal=causal, segment_ids=segment_ids,
                               sliding_window=sliding_window, scale=scale)
