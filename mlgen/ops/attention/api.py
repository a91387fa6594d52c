"""``attention(q, k, v, ...)``: the one entry point; checks inputs and dispatches to a backend.

Backends live in ``BACKENDS`` (name -> ``Backend``). Adding one is one line there: a
``Backend(name, fn, unsupported)`` whose ``fn`` has the signature of ``reference.attention``
plus ``interpret=`` (and the tunables named in ``options``), and whose
``unsupported(problem)`` returns why it cannot run a ``Problem`` (or None). Selection happens
at call time from ``backend=``; nothing is chosen at import. ``auto`` puts ``ring`` first
whenever the active mesh has a ``seq`` axis larger than 1 (sequence parallelism), for every
caller.

:class:`AttentionConfig` is the one config section every model family carries for its
attention layers (backend, block sizes, interpret mode, ring options), validated here against
the registry. :func:`recording` collects which backend each call picked (at trace time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlgen.config import check
from mlgen.ops.attention import _common, blockwise, pallas_gpu, pallas_tpu, reference, ring, xla
from mlgen.ops.attention.block_sizes import BlockSizes
from mlgen.ops.platform import target_platform
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
    platform: str  # the platform compiled for ("cpu", "gpu", "tpu"): _common.target_platform
    interpret: bool
    seq_shards: int = 1  # size of the active mesh's "seq" axis (sequence parallelism when > 1)
    # False when nothing says what the call is compiled for (a jit traced without a mesh or
    # sharded inputs): ``platform`` is then only the host's, and an explicitly named kernel
    # backend is not refused for it (``lower(lowering_platforms=("cuda",))`` decides).
    platform_known: bool = True


@dataclasses.dataclass(frozen=True)
class Backend:
    """A named attention implementation and the rule saying when it cannot run."""

    name: str
    fn: Callable[..., Array]
    unsupported: Callable[[Problem], str | None]
    options: tuple[str, ...] = ()  # keyword tunables fn takes, from AttentionConfig.options()
    kernel: bool = False  # a Pallas kernel: run per shard under a mesh (_common.per_shard)


def _always(p: Problem) -> str | None:
    del p
    return None


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", reference.attention, _always),
    "xla": Backend("xla", xla.attention, _always),
    "blockwise": Backend("blockwise", blockwise.attention, _always, ("block_sizes",)),
    "pallas_gpu": Backend(
        "pallas_gpu", pallas_gpu.attention, pallas_gpu.unsupported, ("block_sizes",), True
    ),
    "pallas_tpu": Backend(
        "pallas_tpu", pallas_tpu.attention, pallas_tpu.unsupported, ("block_sizes",), True
    ),
    # Needs an active mesh with a 'seq' axis; "auto" picks it when that axis is larger than 1.
    "ring": Backend(
        "ring", ring.attention, ring.unsupported, ("block_sizes", "local_backend", "load_balance")
    ),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """How a model's attention layers run: one section shared by every model family.

    Attributes:
      backend: ``"auto"``, a name of ``BACKENDS``, or several tried in order (``"pallas_tpu,xla"``).
      interpret: run Pallas kernels in their interpreter (CPU tests).
      block_sizes: ``(block_q, block_k, block_q_bwd, block_k_bwd)`` for the blocked backends
        (blockwise, Pallas, ring's local backend); empty = each backend's per-shape default.
      ring_local_backend: ring attention's per-block backend: ``auto`` | ``blockwise`` |
        ``pallas_tpu``.
      ring_load_balance: causal ring attention's zigzag layout (equal work per device).
    """

    backend: str = "auto"
    interpret: bool = False
    block_sizes: tuple[int, ...] = ()
    ring_local_backend: str = "auto"
    ring_load_balance: bool = True

    def validate(self) -> None:
        names = self.backend.split(",")
        for b in names:
            check(
                b == "auto" or b in BACKENDS,
                "backend",
                f"unknown backend {b!r}; choose from {['auto', *BACKENDS]} "
                "(or several: 'pallas_tpu,xla')",
            )
        check(
            len(self.block_sizes) in (0, 4),
            "block_sizes",
            "give four sizes (block_q, block_k, block_q_bwd, block_k_bwd) or none, "
            f"got {self.block_sizes}",
        )
        check(
            all(isinstance(b, int) and b > 0 for b in self.block_sizes),
            "block_sizes",
            f"must be positive ints, got {self.block_sizes}",
        )
        check(
            self.ring_local_backend in ("auto", *ring.LOCAL_BACKENDS),
            "ring_local_backend",
            f"must be one of {['auto', *ring.LOCAL_BACKENDS]}, got {self.ring_local_backend!r}",
        )

    @property
    def backends(self) -> str | tuple[str, ...]:
        """``backend`` as ``attention`` takes it: a name or a tuple of names."""
        parts = tuple(self.backend.split(","))
        return parts[0] if len(parts) == 1 else parts

    def options(self) -> dict:
        """The tunables by keyword (``Backend.options`` says which a backend takes)."""
        bs = (
            None
            if not self.block_sizes
            else BlockSizes(
                **dict(zip(("block_q", "block_k", "block_q_bwd", "block_k_bwd"), self.block_sizes))
            )
        )
        return dict(
            block_sizes=bs,
            local_backend=self.ring_local_backend,
            load_balance=self.ring_load_balance,
        )


_RECORDINGS: list[list[tuple[str, Problem]]] = []


@contextlib.contextmanager
def recording():
    """Collects ``(backend name, Problem)`` for every ``attention`` call traced while active."""
    calls: list[tuple[str, Problem]] = []
    _RECORDINGS.append(calls)
    try:
        yield calls
    finally:
        _RECORDINGS.remove(calls)


def describe(calls: Sequence[tuple[str, Problem]]) -> str:
    """One line: each backend picked, with its calls' shapes and counts (``recording``'s list)."""
    counts: dict[str, int] = {}
    for name, p in calls:
        key = (
            f"{name} (T={p.T} S={p.S} N={p.N} K={p.K} H={p.H} {p.dtype}"
            + (" causal" if p.causal else "")
            + (f" seq={p.seq_shards}" if p.seq_shards > 1 else "")
            + ")"
        )
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in counts.items()) or "none"


# On CPU (2 cores, `mlgen bench attention`, causal fwd+bwd, B=1 N=8 H=64 f32) blockwise vs
# XLA speed was 1.0x at T=512, 1.2x at 1k, 2.6x at 2k, 4.3x at 4k (it skips masked blocks and
# stays in cache); below ~1k XLA's single fused program is as fast and has less per-block
# overhead for non-causal inputs, so it keeps short sequences.
CPU_BLOCKWISE_MIN_LEN = 1024


def auto_order(p: Problem) -> tuple[str, ...]:
    """Backends ``auto`` tries, best first, for a problem on its platform.

    Pallas backends are only picked on their own hardware, never in interpret mode; ``ring``
    comes first whenever the active mesh shards the sequence (``seq`` larger than 1).
    """
    ring_first = ("ring",) if p.seq_shards > 1 else ()
    if p.platform == "tpu":
        return ring_first + ("pallas_tpu", "blockwise", "xla")
    if p.platform == "gpu":
        return ring_first + ("pallas_gpu", "xla", "blockwise")
    if max(p.T, p.S) >= CPU_BLOCKWISE_MIN_LEN:
        return ring_first + ("blockwise", "xla")
    return ring_first + ("xla", "blockwise")


def attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    causal: bool = False,
    segment_ids=None,
    sliding_window: int | None = None,
    scale: float | None = None,
    backend: str | Sequence[str] = "auto",
    interpret: bool = False,
    config: AttentionConfig | None = None,
) -> Float[Array, "B T N H"]:
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
      config: an :class:`AttentionConfig` (a model's attention section): its backend,
        interpret mode, block sizes and ring options; ``backend`` and ``interpret`` must then
        keep their defaults.

    Returns:
      ``[B, T, N, H]`` in q's dtype; float32 accumulation inside.

    Raises:
      ValueError: bad shapes / arguments, an explicitly named backend that cannot run these
        inputs, or a sequence whose every backend failed (with each reason).
    """
    if config is not None:
        if backend != "auto" or interpret:
            raise ValueError("attention: pass backend/interpret or config=, not both")
        backend, interpret = config.backends, config.interpret
    options = (config or _DEFAULT_CONFIG).options()
    p = _check(q, k, v, causal, segment_ids, sliding_window, scale, interpret)
    names = _backend_names(backend, p)
    reasons = []
    for name in names:
        b = BACKENDS[name]
        why = b.unsupported(p)
        if why is None:
            run = functools.partial(
                b.fn,
                causal=causal,
                sliding_window=sliding_window,
                scale=scale,
                interpret=interpret,
                **{o: options[o] for o in b.options},
            )
            if b.kernel and not interpret:
                run = functools.partial(_common.per_shard, run)
            else:
                run = functools.partial(_call, run)
            if len(names) == 1:
                return _chosen(name, p, run(q, k, v, segment_ids))
            try:
                return _chosen(name, p, run(q, k, v, segment_ids))
            except (
                ValueError,
                NotImplementedError,
                TypeError,
            ) as e:  # tracing failed: try the next
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        reasons.append(f"{name}: {why}")
    raise ValueError(
        f"attention backend={backend!r}: no backend can run these inputs ("
        + "; ".join(reasons)
        + ")"
    )


_DEFAULT_CONFIG = AttentionConfig()


def _call(fn, q, k, v, segment_ids):
    return fn(q, k, v, segment_ids=segment_ids)


def _chosen(name: str, p: Problem, out):
    for calls in _RECORDINGS:
        calls.append((name, p))
    return out


def _backend_names(backend, p: Problem) -> tuple[str, ...]:
    if isinstance(backend, str):
        names = auto_order(p) if backend == "auto" else (backend,)
    elif isinstance(backend, Sequence) and backend and all(isinstance(b, str) for b in backend):
        names = tuple(n for b in backend for n in (auto_order(p) if b == "auto" else (b,)))
    else:
        raise ValueError(
            f"backend must be a name or a non-empty sequence of names, got {backend!r}"
        )
    for n in names:
        if n not in BACKENDS:
            raise ValueError(
                f"backend={n!r} is unknown; known: 'auto', " + ", ".join(map(repr, BACKENDS))
            )
    return names


def _check(q, k, v, causal, segment_ids, sliding_window, scale, interpret) -> Problem:
    """Validate shapes and arguments; every message names the offending argument."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            want = "[B, T, N, H]" if name == "q" else "[B, S, K, H]"
            raise ValueError(
                f"{name} must be rank 4 {want}, got shape {getattr(x, 'shape', type(x))}"
            )
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
                raise ValueError(
                    f"segment_ids [B, T] needs T == S (got T={T}, S={S}); "
                    "pass a (q_ids, kv_ids) pair"
                )
            segment_ids, shapes = (segment_ids,), ((B, T),)
        for ids, want in zip(segment_ids, shapes):
            if tuple(getattr(ids, "shape", ())) != want or not jnp.issubdtype(
                ids.dtype, jnp.integer
            ):
                raise ValueError(
                    f"segment_ids must be integer arrays of shape {want}, got "
                    f"{getattr(ids, 'shape', type(ids))} {getattr(ids, 'dtype', '')}"
                )
    if sliding_window is not None and (
        isinstance(sliding_window, bool)
        or not isinstance(sliding_window, (int, np.integer))
        or sliding_window < 1
    ):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if scale is not None and not isinstance(scale, (int, float, np.floating, np.integer)):
        raise ValueError(f"scale must be a Python number or None, got {type(scale).__name__}")
    platform, known = target_platform(q, k, v)
    return Problem(
        B=B,
        T=T,
        S=S,
        N=N,
        K=K,
        H=H,
        dtype=np.dtype(q.dtype),
        causal=bool(causal),
        has_segments=segment_ids is not None,
        sliding_window=None if sliding_window is None else int(sliding_window),
        platform=platform,
        platform_known=known,
        interpret=bool(interpret),
        seq_shards=_seq_shards(),
    )


def _seq_shards() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or "seq" not in mesh.axis_names:
        return 1
    return int(mesh.shape["seq"])
