"""``attention(q, k, v, ...)``: the one entry point; checks inputs and dispatches to a backend.

Backends live in ``BACKENDS`` (name -> ``Backend``). Adding one is one line there: a
``Backend(name, fn, unsupported)`` whose ``fn`` has the signature of ``reference.attention``
plus ``interpret=``, and whose ``unsupported(problem)`` returns why it cannot run a
``Problem`` (or None). Selection happens at call time from ``backend=``; nothing is chosen
at import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from mlgen.ops.attention import _common, blockwise, pallas_gpu, pallas_tpu, reference, ring, xla
from mlgen.typing import Array, Float


@dataclasses.dataclass(frozen=True)
class Problem:
    """What a backend needs to know to say whether it can run a call (all static)."""

    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    dtype: np.dtype
    causal: bool
    has_segments: bool
    sliding_window: int | None
    platform: str   # jax.default_backend() at call time: "cpu", "gpu", "tpu"
    interpret: bool


@dataclasses.dataclass(frozen=True)
class Backend:
    """A named attention implementation and the rule saying when it cannot run."""

    name: str
    fn: Callable[..., Array]
    unsupported: Callable[[Problem], str | None]


def _always(p: Problem) -> str | None:
    del p
    return None


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", reference.attention, _always),
    "xla": Backend("xla", xla.attention, _always),
    "blockwise": Backend("blockwise", blockwise.attention, _always),
    "pallas_gpu": Backend("pallas_gpu", pallas_gpu.attention, pallas_gpu.unsupported),
    "pallas_tpu": Backend("pallas_tpu", pallas_tpu.attention, pallas_tpu.unsupported),
    "ring": Backend("ring", ring.attention, ring.unsupported),  # explicit only: needs a mesh 'seq' axis
}

# On CPU (2 cores, `mlgen bench attention`, causal fwd+bwd, B=1 N=8 H=64 f32) blockwise vs
# XLA speed was 1.0x at T=512, 1.2x at 1k, 2.6x at 2k, 4.3x at 4k (it skips masked blocks and
# stays in cache); below ~1k XLA's single fused program is as fast and has less per-block
# overhead for non-causal inputs, so it keeps short sequences.
CPU_BLOCKWISE_MIN_LEN = 1024


def auto_order(p: Problem) -> tuple[str, ...]:
    """Backends ``auto`` tries, best first, for a problem on its platform.

    Pallas backends are only picked on their own hardware, never in interpret mode.
    """
    if p.platform == "tpu":
        return ("pallas_tpu", "blockwise", "xla")
    if p.platform == "gpu":
        return ("pallas_gpu", "xla", "blockwise")
    if max(p.T, p.S) >= CPU_BLOCKWISE_MIN_LEN:
        return ("blockwise", "xla")
    return ("xla", "blockwise")


def attention(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"], *,
              causal: bool = False, segment_ids=None, sliding_window: int | None = None,
              scale: float | None = None, backend: str | Sequence[str] = "auto",
              interpret: bool = False) -> Float[Array, "B T N H"]:
    """Multi-head attention with grouped K/V heads.

    Args:
      q: queries ``[B, T, N, H]``.
      k, v: keys / values ``[B, S, K, H]``, N a multiple of K (GQA / MQA). When T != S the
        queries are the last T of the S positions (causal decoding).
      causal: mask keys after each query's position.
      segment_ids: None, ``[B, T]`` ints (self-attention, T == S) or a ``(q_ids [B, T],
        kv_ids [B, S])`` pair; a query attends only to keys with the same id. A query
        that can see no key gets a zero output.
      sliding_window: if set, a query sees keys less than this many positions away.
      scale: logit scale, default ``H ** -0.5``.
      backend: "auto", one of ``BACKENDS`` ("reference", "xla", "blockwise", "pallas_gpu",
        "pallas_tpu"), or a sequence of names tried in order.
      interpret: run Pallas kernels in the Pallas interpreter (for CPU tests).

    Returns:
      ``[B, T, N, H]`` in q's dtype; float32 accumulation inside.

    Raises:
      ValueError: bad shapes / arguments, an explicitly named backend that cannot run these
        inputs, or a sequence whose every backend failed (with each reason).
    """
    p = _check(q, k, v, causal, segment_ids, sliding_window, scale, interpret)
    names = _backend_names(backend, p)
    reasons = []
    for name in names:
        b = BACKENDS[name]
        why = b.unsupported(p)
        if why is None:
            if len(names) == 1:
                return b.fn(q, k, v, causal=causal, segment_ids=segment_ids, sliding_window=sliding_window,
                            scale=scale, interpret=interpret)
            try:
                return b.fn(q, k, v, causal=causal, segment_ids=segment_ids, sliding_window=sliding_window,
                            scale=scale, interpret=interpret)
            except (ValueError, NotImplementedError, TypeError) as e:  # tracing failed: try the next
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        reasons.append(f"{name}: {why}")
    raise ValueError(f"attention backend={backend!r}: no backend can run these inputs ("
                     + "; ".join(reasons) + ")")


def _backend_names(backend, p: Problem) -> tuple[str, ...]:
    if isinstance(backend, str):
        names = auto_order(p) if backend == "auto" else (backend,)
    elif isinstance(backend, Sequence) and backend and all(isinstance(b, str) for b in backend):
        names = tuple(n for b in backend for n in (auto_order(p) if b == "auto" else (b,)))
    else:
        raise ValueError(f"backend must be a name or a non-empty sequence of names, got {backend!r}")
    for n in names:
        if n not in BACKENDS:
            raise ValueError(f"backend={n!r} is unknown; known: 'auto', " + ", ".join(map(repr, BACKENDS)))
    return names


def _check(q, k, v, causal, segment_ids, sliding_window, scale, interpret) -> Problem:
    """Validate shapes and arguments; every message names the offending argument."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            want = "[B, T, N, H]" if name == "q" else "[B, S, K, H]"
            raise ValueError(f"{name} must be rank 4 {want}, got shape {getattr(x, 'shape', type(x))}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    B, T, N, H = q.shape
    _, S, K, Hk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"v shape {v.shape} must equal k shape {k.shape}")
    if k.shape[0] != B:
        raise ValueError(f"k batch B={k.shape[0]} must equal q batch B={B}")
    if Hk != H:
        raise ValueError(f"k head dim H={Hk} must equal q head dim H={H}")
    if K == 0 or N % K:
        raise ValueError(f"q heads N={N} must be a multiple of k/v heads K={K}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if T == 0 or S == 0:
        raise ValueError(f"q length T={T} and k length S={S} must be positive")
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError("segment_ids pair must be (q_ids [B, T], kv_ids [B, S])")
            shapes = ((B, T), (B, S))
        else:
            if T != S:
                raise ValueError(f"segment_ids [B, T] needs T == S (got T={T}, S={S}); pass a (q_ids, kv_ids) pair")
            segment_ids, shapes = (segment_ids,), ((B, T),)
        for ids, want in zip(segment_ids, shapes):
            if tuple(getattr(ids, "shape", ())) != want or not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"segment_ids must be integer arrays of shape {want}, got "
                                 f"{getattr(ids, 'shape', type(ids))} {getattr(ids, 'dtype', '')}")
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, (int, np.integer))
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if scale is not None and not isinstance(scale, (int, float, np.floating, np.integer)):
        raise ValueError(f"scale must be a Python number or None, got {type(scale).__name__}")
    return Problem(B=B, T=T, S=S, N=N, K=K, H=H, dtype=np.dtype(q.dtype), causal=bool(causal),
                   has_segments=segment_ids is not None,
                   sliding_window=None if sliding_window is None else int(sliding_window),
                   platform=_common.platform(), interpret=bool(interpret))
