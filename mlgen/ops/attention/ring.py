"""Ring attention over one mesh axis (``seq``): ``shard_map`` + ``ppermute`` around a local backend.

Each device holds ``T / n`` queries and the matching ``T / n`` keys/values. In ``n`` steps the
K/V blocks (and their segment ids) travel round the ring; at each step a device attends its
queries to the block it holds with the local backend's ``attention_with_lse`` and merges the
partial result by online softmax (``logaddexp`` of the log-sum-exps).

The backward pass is a ring too (``custom_vjp``): dQ accumulates at home, while dK/dV
accumulators travel with their K/V blocks and arrive home after the last step. Per-device
memory is O(T / n) in both passes. Each block's backward is the flash backward with the
*global* output and log-sum-exp saved by the forward (``blockwise.attention_vjp_with_lse``):
``p = exp(s - lse)`` is already the block's share of each row's softmax, so no block forward
is recomputed.

Causal load balancing (zigzag): the sequence is cut into ``2n`` chunks and device ``i`` holds
chunks ``i`` and ``2n-1-i``, so every device has the same number of unmasked blocks at each
step. The reordering happens inside, with two ``ppermute`` s in and two out, on
already-rotated (RoPE'd) inputs, so positions and segment ids mean what the caller meant and
the caller never sees the permutation. Fully masked chunk pairs cost nothing: the local
backend skips every block its (traced) ``q_offset`` puts above the diagonal.

Local backends: ``blockwise`` (plain JAX, takes a traced query offset, so any geometry) and
``pallas_tpu`` (our Mosaic kernels, picked by ``local_backend="auto"`` on a TPU). Kernels
take static offsets only, so a causal block is dispatched by ``lax.switch`` to one of three
static calls: fully visible (non-causal kernel), the diagonal (causal kernel) or fully
masked (skipped); sliding windows stay on ``blockwise``.

Cross-attention with only the queries sharded (``kv_sharded=False``, the default when
``S != T``): K/V stay replicated and each device attends its queries to all keys; no ring.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from mlgen.ops.attention import blockwise, pallas_tpu
from mlgen.ops.attention.block_sizes import BlockSizes
from mlgen.ops.platform import platform
from mlgen.typing import Array, Float

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Local:
    """A per-block backend: forward with lse, and the backward from the global out / lse."""

    fwd: Callable
    vjp: Callable
    # Takes a traced ``q_offset`` (any causal / window geometry). Without it, causal blocks are
    # dispatched by ``lax.switch`` to three static calls: fully visible (non-causal), the
    # diagonal (causal, offset 0) and fully masked (skipped); no sliding window.
    traced_offset: bool
    kernel: bool = False  # a Pallas kernel: takes ``interpret``


_LOCAL = {
    "blockwise": _Local(
        blockwise.attention_with_lse, blockwise.attention_vjp_with_lse, traced_offset=True
    ),
    "pallas_tpu": _Local(
        pallas_tpu.attention_with_lse,
        pallas_tpu.attention_vjp_with_lse,
        traced_offset=False,
        kernel=True,
    ),
}
LOCAL_BACKENDS = tuple(_LOCAL)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static description of one ring call (hashable: a custom_vjp nondiff argument)."""

    axis: str
    n: int
    chunks: int  # query / key chunks per device: 2 with zigzag, else 1
    chunk: int  # length of one chunk
    causal: bool
    window: int | None
    scale: float
    local: str
    block_sizes: BlockSizes | None
    interpret: bool = False

    def chunk_ids(self, d):
        """Global chunk indices held by device ``d`` (a traced scalar)."""
        return (d,) if self.chunks == 1 else (d, 2 * self.n - 1 - d)

    def pairs(self):
        """(query chunk, key chunk) slots that can see each other at some step.

        With zigzag, a device's first chunk (index d < n) never sees another device's second
        chunk (index 2n-1-src >= n), so that pair is left out of the program.
        """
        if self.chunks == 1:
            return ((0, 0),)
        return ((0, 0), (1, 0), (1, 1))


def ring_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    mesh=None,
    axis: str = "seq",
    causal: bool = False,
    segment_ids=None,
    sliding_window: int | None = None,
    scale: float | None = None,
    load_balance: bool = True,
    kv_sharded: bool | None = None,
    local_backend: str = "auto",
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T N H"]:
    """Attention with the length dimension sharded over mesh ``axis``.

    Args:
      q: queries ``[B, T, N, H]``, global, sharded (or to be sharded) over ``axis`` on T.
      k, v: keys / values ``[B, S, K, H]``: sharded like q when ``kv_sharded`` (self-attention),
        else replicated over ``axis`` (cross-attention with only the queries sharded; the
        queries are then the last T of the S positions for ``causal``, as everywhere).
      mesh: a ``Mesh`` / ``AbstractMesh``; default the active one (``jax.set_mesh``). Other
        mesh axes keep whatever sharding the inputs have (partial-manual ``shard_map``).
      axis: the mesh axis the sequence is split over; T (and S if sharded) must divide by it.
      causal, segment_ids, sliding_window, scale: as in ``mlgen.ops.attention``
        (``segment_ids``: ``[B, T]`` or a ``(q_ids [B, T], kv_ids [B, S])`` pair).
      load_balance: causal only: zigzag chunks so every device does equal work (needs
        ``T % (2 n) == 0``; otherwise contiguous blocks are used).
      kv_sharded: whether K/V are split over ``axis``; default ``S == T``.
      local_backend: the per-block backend: "blockwise", "pallas_tpu" (our Mosaic kernels;
        no sliding window, and causal only with K/V sharded), or "auto" (default):
        "pallas_tpu" on a TPU when it can run the call, else "blockwise".
      interpret: run a Pallas local backend in its interpreter (CPU tests).
      block_sizes: the local backend's tunables.

    Returns:
      ``[B, T, N, H]`` in q's dtype, sharded like q.
    """
    if local_backend != "auto" and local_backend not in _LOCAL:
        raise ValueError(
            f"ring_attention: local_backend={local_backend!r} unsupported; choose from "
            f"{['auto', *_LOCAL]}"
        )
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or axis not in mesh.axis_names:
        raise ValueError(
            f"ring_attention needs a mesh with axis {axis!r} (pass mesh= or use jax.set_mesh); "
            f"got {None if mesh is None or mesh.empty else mesh.axis_names}"
        )
    n = mesh.shape[axis]
    B, T, N, H = q.shape
    S = k.shape[1]
    scale = H**-0.5 if scale is None else float(scale)
    kv_sharded = (S == T) if kv_sharded is None else kv_sharded
    if kv_sharded and S != T:
        raise ValueError(f"ring_attention: kv_sharded needs S == T, got T={T}, S={S}")
    if T % n:
        raise ValueError(
            f"ring_attention: q length T={T} is not divisible by mesh axis {axis!r} of size {n}"
        )
    q_ids = kv_ids = None
    if segment_ids is not None:
        q_ids, kv_ids = (
            segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        )
        q_ids, kv_ids = q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)
    why_not_kernel = _why_not_static_offsets(causal, sliding_window, kv_sharded)
    if local_backend == "auto":
        kernel_ok = why_not_kernel is None and pallas_tpu.kernel_unsupported(H, q.dtype) is None
        local_backend = "pallas_tpu" if platform(q) == "tpu" and kernel_ok else "blockwise"
    elif not _LOCAL[local_backend].traced_offset and why_not_kernel:
        raise ValueError(
            f"ring_attention: local_backend={local_backend!r} {why_not_kernel}; use 'blockwise'"
        )
    if n == 1:
        local = _local_call(local_backend, causal, sliding_window, scale, block_sizes, interpret)
        ids = None if q_ids is None else (q_ids, kv_ids)
        return local(q, k, v, segment_ids=ids)[0]

    Tl = T // n
    zigzag = kv_sharded and causal and load_balance and Tl % 2 == 0
    cfg = _Ring(
        axis=axis,
        n=n,
        chunks=2 if zigzag else 1,
        chunk=Tl // 2 if zigzag else Tl,
        causal=causal,
        window=sliding_window,
        scale=scale,
        local=local_backend,
        block_sizes=block_sizes,
        interpret=bool(interpret),
    )
    args = (q, k, v) + ((q_ids, kv_ids) if q_ids is not None else ())
    return _sharded(mesh, cfg, kv_sharded, q_ids is not None, S - T)(*args)


def _local_call(local_backend: str, causal, sliding_window, scale, block_sizes, interpret):
    extra = dict(interpret=interpret) if _LOCAL[local_backend].kernel else {}
    return functools.partial(
        _LOCAL[local_backend].fwd,
        causal=causal,
        sliding_window=sliding_window,
        scale=scale,
        block_sizes=block_sizes,
        **extra,
    )


@functools.lru_cache(maxsize=64)
def _sharded(mesh, cfg: _Ring, kv_sharded: bool, has_ids: bool, q_offset: int) -> Callable:
    """The ring as one jitted ``shard_map`` over ``cfg.axis`` (cached per static setting).

    Under ``jit`` the inner jit is inlined. Called eagerly, a partial-manual ``shard_map`` (a
    mesh with other axes besides ``cfg.axis``, e.g. ``data``) fails in JAX's eager path
    ("out_specs refers to 'data'"); jitted it runs, and the cache keeps repeated eager calls
    from compiling again.
    """
    axis, n, Tl = cfg.axis, cfg.n, cfg.chunk * cfg.chunks
    local_backend, zigzag = cfg.local, cfg.chunks == 2
    local = _local_call(
        local_backend, cfg.causal, cfg.window, cfg.scale, cfg.block_sizes, cfg.interpret
    )
    seq, rep = P(None, axis), P()
    kv_spec = seq if kv_sharded else rep
    in_specs = (seq, kv_spec, kv_spec) + ((seq, kv_spec) if has_ids else ())

    def body(q, k, v, *ids):
        q_ids, kv_ids = ids if has_ids else (None, None)
        if not kv_sharded:
            d = lax.axis_index(axis)
            pair = None if q_ids is None else (q_ids, kv_ids)
            if not _LOCAL[local_backend].traced_offset:  # non-causal (checked): no offset needed
                return local(q, k, v, segment_ids=pair)[0]
            return local(q, k, v, segment_ids=pair, q_offset=q_offset + d * Tl)[0]
        if zigzag:
            q, k, v, q_ids, kv_ids = (
                None if x is None else _to_zigzag(x, axis, n) for x in (q, k, v, q_ids, kv_ids)
            )
        out = _ring(q, k, v, q_ids, kv_ids, cfg)
        return _from_zigzag(out, axis, n) if zigzag else out

    # check_vma=False: the local backend's loops start from constants (not device-varying);
    # every collective here is explicit and the ring's gradient is our own custom_vjp.
    return jax.jit(
        jax.shard_map(
            body, mesh=mesh, in_specs=in_specs, out_specs=seq, axis_names={axis}, check_vma=False
        )
    )


def _why_not_static_offsets(causal: bool, sliding_window, kv_sharded: bool) -> str | None:
    """Why a local backend without a traced ``q_offset`` cannot run this ring (or None)."""
    if sliding_window is not None:
        return "takes no sliding_window inside a ring (block offsets are traced)"
    if causal and not kv_sharded:
        return (
            "takes no causal cross-attention with replicated K/V inside a ring "
            "(the offset is traced)"
        )
    return None


# --- zigzag layout: device i holds chunks (i, 2n-1-i) of the 2n equal chunks ---------------------


def _zigzag_perms(n: int):
    """ppermute pairs moving each device's even and odd natural chunk to its zigzag home."""

    def home(c):
        return c if c < n else 2 * n - 1 - c

    even = [(j, home(2 * j)) for j in range(n)]
    odd = [(j, home(2 * j + 1)) for j in range(n)]
    return even, odd


def _to_zigzag(x, axis: str, n: int):
    """Natural contiguous block (chunks 2d, 2d+1) -> zigzag block (chunks d, 2n-1-d), on dim 1."""
    even, odd = _zigzag_perms(n)
    a, b = jnp.split(x, 2, axis=1)
    ra, rb = lax.ppermute(a, axis, even), lax.ppermute(b, axis, odd)
    # Device d gets chunk d from the even send iff d is even, and chunk 2n-1-d from the other.
    d_even = lax.axis_index(axis) % 2 == 0
    return jnp.concatenate([jnp.where(d_even, ra, rb), jnp.where(d_even, rb, ra)], axis=1)


def _from_zigzag(x, axis: str, n: int):
    even, odd = _zigzag_perms(n)
    inv = lambda perm: [(dst, src) for src, dst in perm]  # noqa: E731
    s0, s1 = jnp.split(x, 2, axis=1)
    d_even = lax.axis_index(axis) % 2 == 0
    ra = lax.ppermute(jnp.where(d_even, s0, s1), axis, inv(even))  # back to the even slot
    rb = lax.ppermute(jnp.where(d_even, s1, s0), axis, inv(odd))
    return jnp.concatenate([ra, rb], axis=1)


# --- the ring: custom_vjp over per-device blocks --------------------------------------------------


def _split(x, parts: int):
    return (None,) * parts if x is None else tuple(jnp.split(x, parts, axis=1))


def _rotate(xs, axis: str, n: int):
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis, perm), xs)


def _on_block(cfg: _Ring, d, src, a: int, b: int, qid, kid, call, skipped):
    """``call(**kw)`` for query chunk ``a`` of device ``d`` against key chunk ``b`` of ``src``.

    ``call`` runs the local backend's forward or backward (the caller picks) with the block's
    mask keywords; ``skipped()`` is the result for a fully masked block when the backend takes
    no traced offset.
    """
    local = _LOCAL[cfg.local]
    off = ((cfg.chunk_ids(d)[a] - cfg.chunk_ids(src)[b]) * cfg.chunk).astype(jnp.int32)
    kw = dict(
        sliding_window=cfg.window,
        scale=cfg.scale,
        block_sizes=cfg.block_sizes,
        segment_ids=None if qid is None else (qid, kid),
    )
    if local.kernel:
        kw["interpret"] = cfg.interpret
    if local.traced_offset:
        return call(causal=cfg.causal, q_offset=off, **kw)
    if not cfg.causal:
        return call(causal=False, **kw)
    # Equal chunks: off > 0 sees the whole block, off == 0 is the causal diagonal, off < 0 nothing.
    case = jnp.where(off > 0, 0, jnp.where(off == 0, 1, 2))
    if cfg.interpret:
        # The Mosaic interpreter steps the devices' kernel calls in lockstep: a device that skips
        # a call while another makes one deadlocks the ring's next ppermute. Interpreted, a
        # skipped block still runs the full-block kernel and discards it (never on a TPU).
        def skip():
            call(causal=False, **kw)
            return skipped()
    else:
        skip = skipped
    return lax.switch(
        case, [lambda: call(causal=False, **kw), lambda: call(causal=True, **kw), skip]
    )


def _merge(o1, l1, o2, l2):
    lse = jnp.logaddexp(l1, l2)
    ls = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w1, w2 = jnp.exp(l1 - ls), jnp.exp(l2 - ls)
    return w1[..., None] * o1 + w2[..., None] * o2.astype(_F32), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, q_ids, kv_ids, cfg: _Ring):
    return _ring_fwd(q, k, v, q_ids, kv_ids, cfg)[0]


def _ring_fwd(q, k, v, q_ids, kv_ids, cfg: _Ring):
    c, n = cfg.chunks, cfg.n
    d = lax.axis_index(cfg.axis)
    qs, qids = _split(q, c), _split(q_ids, c)
    acc0 = tuple((jnp.zeros_like(qa, _F32), jnp.full_like(qa[..., 0], -jnp.inf, _F32)) for qa in qs)

    def compute(s, kv, acc):
        k, v, kv_ids = kv
        src = (d - s) % n
        ks, vs, kids = _split(k, c), _split(v, c), _split(kv_ids, c)
        acc = list(acc)
        for a, b in cfg.pairs():
            qa, kb, vb = qs[a], ks[b], vs[b]
            part = _on_block(
                cfg,
                d,
                src,
                a,
                b,
                qids[a],
                kids[b],
                lambda **kw: _LOCAL[cfg.local].fwd(qa, kb, vb, **kw),
                lambda: (jnp.zeros_like(qa), jnp.full(qa.shape[:3], -jnp.inf, _F32)),
            )
            acc[a] = _merge(*acc[a], *part)
        return tuple(acc)

    def step(s, carry):
        kv, acc = carry
        acc = compute(s, kv, acc)
        return _rotate(kv, cfg.axis, n), acc

    # n steps and n hops (the last hop is spare) keep one copy of the step in the program.
    _, acc = lax.fori_loop(0, n, step, ((k, v, kv_ids), acc0))
    out = jnp.concatenate([o for o, _ in acc], axis=1).astype(q.dtype)
    lse = jnp.concatenate([lse for _, lse in acc], axis=1)
    return out, (q, k, v, q_ids, kv_ids, out, lse)


def _ring_bwd(cfg: _Ring, res, do):
    q, k, v, q_ids, kv_ids, out, lse = res
    c, n = cfg.chunks, cfg.n
    d = lax.axis_index(cfg.axis)
    qs, qids, dos, outs, lses = (
        _split(q, c),
        _split(q_ids, c),
        _split(do, c),
        _split(out, c),
        _split(lse, c),
    )

    def compute(s, kv, dkv, dq):
        k, v, kv_ids = kv
        dk, dv = dkv
        src = (d - s) % n
        ks, vs, kids = _split(k, c), _split(v, c), _split(kv_ids, c)
        dks, dvs, dq = list(_split(dk, c)), list(_split(dv, c)), list(dq)
        for a, b in cfg.pairs():
            qa, kb, vb, oa, la, doa = qs[a], ks[b], vs[b], outs[a], lses[a], dos[a]
            dqa, dkb, dvb = _on_block(
                cfg,
                d,
                src,
                a,
                b,
                qids[a],
                kids[b],
                lambda **kw: _LOCAL[cfg.local].vjp(qa, kb, vb, oa, la, doa, **kw),
                lambda: (jnp.zeros_like(qa), jnp.zeros_like(kb), jnp.zeros_like(vb)),
            )
            dq[a] = dq[a] + dqa.astype(_F32)
            dks[b] = dks[b] + dkb.astype(_F32)
            dvs[b] = dvs[b] + dvb.astype(_F32)
        return (jnp.concatenate(dks, axis=1), jnp.concatenate(dvs, axis=1)), tuple(dq)

    def step(s, carry):
        kv, dkv, dq = carry
        dkv, dq = compute(s, kv, dkv, dq)
        kv, dkv = _rotate((kv, dkv), cfg.axis, n)  # dK/dV travel with their blocks
        return kv, dkv, dq

    dkv0 = (jnp.zeros_like(k, _F32), jnp.zeros_like(v, _F32))
    dq0 = tuple(jnp.zeros_like(qa, _F32) for qa in qs)
    # After n steps and n hops every dK/dV accumulator is back on its block's home device.
    _, (dk, dv), dq = lax.fori_loop(0, n, step, ((k, v, kv_ids), dkv0, dq0))
    dq = jnp.concatenate(dq, axis=1)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# --- the registry entry: ``mlgen.ops.attention(..., backend="ring")`` -----------------------------


def unsupported(p) -> str | None:
    """Why ``backend="ring"`` cannot run problem ``p`` under the active mesh (or None)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or "seq" not in mesh.axis_names:
        return "needs an active mesh with a 'seq' axis (jax.set_mesh / mlgen.sharding.use)"
    n = mesh.shape["seq"]
    if p.T % n:
        return f"q length T={p.T} is not divisible by mesh axis 'seq' of size {n}"
    return None


def attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    segment_ids=None,
    sliding_window: int | None = None,
    scale: float | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    local_backend: str = "auto",
    load_balance: bool = True,
) -> Float[Array, "B T N H"]:
    """``ring_attention`` over the active mesh's ``seq`` axis;
    same contract as ``reference.attention``."""
    return ring_attention(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids,
        sliding_window=sliding_window,
        scale=scale,
        block_sizes=block_sizes,
        interpret=interpret,
        local_backend=local_backend,
        load_balance=load_balance,
    )
