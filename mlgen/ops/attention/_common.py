"""Pieces shared by the attention backends: the mask rule, block ranges, padding.

Every backend sees the same normalised problem: q ``[B, T, N, H]``, k/v ``[B, S, K, H]``,
optional segment ids as a pair ``q_ids [B, T]``, ``kv_ids [B, S]`` (int32), ``causal``,
``sliding_window`` and the query offset ``S - T`` (queries are the last T of S positions).
The helpers below are written with plain ``jnp``/``lax`` scalar ops so that the same code
runs in XLA, inside Pallas Triton kernels and inside Pallas Mosaic kernels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of the mask: which rules apply and where the queries sit."""

    causal: bool
    sliding_window: int | None
    kv_len: int  # true key length S; keys at or past it are padding
    has_segments: bool
    kv_padded: bool = False  # the key axis was padded past kv_len: mask those keys


def block_mask(spec: MaskSpec, qpos, kpos, q_ids=None, kv_ids=None):
    """Boolean ``True = attend`` for broadcastable query / key position arrays.

    ``qpos`` are query positions already shifted by ``q_offset``. Padding keys (``kpos >=
    kv_len``) are always masked. Returns None when nothing can be masked (no rule applies).
    """
    mask = None

    def _and(a, b):
        return b if a is None else a & b

    if spec.causal:
        mask = _and(mask, kpos <= qpos)
    if spec.sliding_window is not None:
        mask = _and(mask, (qpos - kpos) < spec.sliding_window)
        if not spec.causal:
            mask = _and(mask, (kpos - qpos) < spec.sliding_window)
    if spec.has_segments:
        mask = _and(mask, q_ids == kv_ids)
    if spec.kv_padded:
        mask = _and(mask, kpos < spec.kv_len)
    return mask


def _div_nonneg(a, b: int):
    """floor(max(a, 0) / b) using only non-negative integer division (safe in every lowering)."""
    return lax.div(jnp.maximum(a, 0), jnp.int32(b)) if not isinstance(a, int) else max(a, 0) // b


def kv_block_range(spec: MaskSpec, q_offset, i, block_q: int, block_k: int, num_k_blocks: int):
    """[lo, hi) of key blocks that query block ``i`` can see (others are fully masked).

    ``q_offset`` (int or traced int32 scalar) is the position of query 0 among the keys.
    """
    q_first = q_offset + i * block_q
    q_last = q_first + block_q - 1
    hi = num_k_blocks
    lo = 0
    if spec.causal:
        hi = _min(hi, _div_nonneg(q_last + block_k, block_k))
    if spec.sliding_window is not None:
        w = spec.sliding_window
        lo = _div_nonneg(q_first - w + 1, block_k)
        if not spec.causal:
            hi = _min(hi, _div_nonneg(q_last + w - 1 + block_k, block_k))
    hi = _min(hi, -(-spec.kv_len // block_k))
    return lo, _max(hi, lo)


def q_block_range(
    spec: MaskSpec, q_offset, j, block_q: int, block_k: int, num_q_blocks: int, q_len: int
):
    """[lo, hi) of query blocks that can see key block ``j`` (the transpose of the above)."""
    k_first = j * block_k
    k_last = k_first + block_k - 1
    lo = 0
    hi = _min(num_q_blocks, -(-q_len // block_q))
    if spec.causal:
        lo = _div_nonneg(k_first - q_offset, block_q)
    if spec.sliding_window is not None:
        w = spec.sliding_window
        # q_first(i) < k_last + w  <=>  i < (k_last + w - q_offset) / block_q
        hi = _min(hi, _div_nonneg(k_last + w - q_offset + block_q - 1, block_q))
        if not spec.causal:
            lo = _max(lo, _div_nonneg(k_first - w + 1 - q_offset, block_q))
    # A key block made only of padding is seen by nobody.
    hi = _where(k_first >= spec.kv_len, lo, hi)
    return lo, _max(hi, lo)


def _min(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def _max(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _where(c, a, b):
    if isinstance(c, bool):
        return a if c else b
    return jnp.where(c, a, b)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_axis(x, axis: int, size: int, value=0):
    """Pad ``x`` along ``axis`` at the end up to ``size``."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def online_softmax_finish(m, row_sum, acc):
    """Turn running (max, sum, un-normalised output) into (output, log-sum-exp).

    Rows that saw no key (``row_sum == 0``) give output 0 and lse ``-inf``.
    """
    empty = row_sum == 0
    out = acc / jnp.where(empty, 1.0, row_sum)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, row_sum)))
    return out, lse


def safe_max(m):
    """Row max with ``-inf`` (nothing seen yet) replaced by 0 so ``exp(s - m)`` stays finite."""
    return jnp.where(m == -jnp.inf, 0.0, m)


def default_interpret_params():
    """Interpret-mode flag for Mosaic (TPU) kernels run on CPU."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


def per_shard(fn: Callable, q, k, v, segment_ids):
    """``fn(q, k, v, segment_ids=)`` once per shard when a mesh of several devices is active.

    XLA cannot partition a Pallas kernel (Mosaic says "cannot be automatically partitioned"),
    so a kernel call under a mesh runs inside ``shard_map``: batch split the way the active
    logical rules split ``batch`` (every non-``seq`` axis when no rules are set), heads the way
    they split ``heads`` when both N and K divide, each only as far as the sizes divide;
    whatever is left is replicated (correct, but computed on every device of that axis).
    Axes already manual (inside another ``shard_map``) are left alone.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        mesh = getattr(getattr(jax.typeof(q), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty:
        return fn(q, k, v, segment_ids=segment_ids)
    types = getattr(mesh, "axis_types", (AxisType.Auto,) * len(mesh.axis_names))
    free = [a for a, t in zip(mesh.axis_names, types) if t != AxisType.Manual]
    if math.prod(mesh.shape[a] for a in free) == 1:
        return fn(q, k, v, segment_ids=segment_ids)
    rules = dict(flax.core.spmd.get_logical_axis_rules())
    if rules:
        batch, heads = _axes_of(rules.get("batch")), _axes_of(rules.get("heads"))
    else:
        batch, heads = tuple(a for a in free if a != "seq"), ()
    batch = _dividing(tuple(a for a in batch if a in free), mesh, q.shape[0])
    heads = tuple(a for a in heads if a in free and a not in batch)
    n_heads = math.prod(mesh.shape[a] for a in heads)
    if q.shape[2] % n_heads or k.shape[2] % n_heads:
        heads = ()
    b = None if not batch else (batch[0] if len(batch) == 1 else batch)
    h = None if not heads else (heads[0] if len(heads) == 1 else heads)
    spec, ids_spec = P(b, None, h, None), P(b, None)
    ids = (
        ()
        if segment_ids is None
        else tuple(segment_ids)
        if isinstance(segment_ids, (tuple, list))
        else (segment_ids,)
    )
    pair = isinstance(segment_ids, (tuple, list))

    def body(q, k, v, *ids):
        seg = None if not ids else (tuple(ids) if pair else ids[0])
        return fn(q, k, v, segment_ids=seg)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(spec, spec, spec) + (ids_spec,) * len(ids),
        out_specs=spec,
        axis_names=set(free),
        check_vma=False,
    )(q, k, v, *ids)


def _axes_of(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _dividing(axes: tuple[str, ...], mesh, size: int) -> tuple[str, ...]:
    """The longest prefix of ``axes`` whose sizes multiply to a divisor of ``size``."""
    out: list[str] = []
    for a in axes:
        if size % (math.prod(mesh.shape[x] for x in out) * mesh.shape[a]):
            break
        out.append(a)
    return tuple(out)


def _precision(a, b):
    # Explicit, so a global jax_default_matmul_precision cannot ask Mosaic for an fp32
    # contraction of bf16 tiles (which it rejects); float32 tiles get full float32.
    both_f32 = a.dtype == jnp.float32 and b.dtype == jnp.float32
    return lax.Precision.HIGHEST if both_f32 else lax.Precision.DEFAULT


def dot_nn(a, b):
    """``a @ b`` for 2-D tiles with float32 accumulation (lowers in Triton and Mosaic)."""
    return lax.dot_general(
        a,
        b,
        (((1,), (0,)), ((), ())),
        precision=_precision(a, b),
        preferred_element_type=jnp.float32,
    )


def dot_nt(a, b):
    """``a @ b.T`` for 2-D tiles with float32 accumulation, without materialising ``b.T``."""
    return lax.dot_general(
        a,
        b,
        (((1,), (1,)), ((), ())),
        precision=_precision(a, b),
        preferred_element_type=jnp.float32,
    )


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())
