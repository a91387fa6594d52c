"""Sequence-parallel SSMs: Mamba-2's SSD, Mamba's selective scan and the short causal conv with
the length axis T split over one mesh axis (``seq``), each device holding ``T / n``
consecutive tokens, inside ``jax.shard_map``.

The recurrence ``h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t`` is linear in ``h``, so a shard of
tokens acts on the state entering it as an affine map ``h -> exp(L) h + h_own``: ``h_own`` is
the shard's final state from a zero start, ``L`` its total log decay (``sum_t dt_t a``: per head
for SSD, per channel and state for the selective scan; a ``reset`` inside the shard makes the
map constant). Each device:

1. runs the one-device chunked op (:func:`mlgen.ops.ssm.ssd` /
   :func:`mlgen.ops.ssm.selective_scan`) on its tokens from a zero state (device 0 from
   ``initial_state``): its outputs are exact but for the entering state's part;
2. composes the maps of the devices before it, an exclusive scan over devices of the small
   ``[B, N, H, S]`` (``[B, C, S]``) states and ``[B, N]`` (``[B, C]``) log decays (below);
3. adds the entering state's contribution to its outputs: ``c_t . (exp(decay from the shard
   start to t) h_enter)``, by matmuls for SSD and by chunks of ``[B, L, C, S]`` (rematerialised,
   as the selective scan's own chunks are) for the selective scan.

Only states cross devices, never the ``[B, T, ...]`` activations (the tests check the compiled
HLO). The scan over devices (``exchange``):

- ``"ppermute"`` (default): a shift by one device, then ``ceil(log2 n)`` doubling steps
  (Hillis-Steele), each a ``ppermute`` of one state per device. Traffic and memory per device
  are ``O(log n)`` states.
- ``"all_gather"``: one ``all_gather`` of every device's state and decay, then the same
  composition locally. One collective (lower latency for small n), but each device receives
  and holds ``n - 1`` states against ``1 + ceil(log2 n)`` sent one at a time.

Either way the global final state (the last device's) is replicated by one ``psum`` of a state
that is zero on all other devices; XLA drops it when it is unused, as in a training step.

The default is ``ppermute`` because the seq axis is large exactly where this path matters (long
contexts over many chips), and a Mamba-2 state is not tiny (``2 D S`` floats per row and layer:
4 MB at D = 4096, S = 128), so ``n`` of them per layer held at once is what to avoid.

Work beyond the local op: for SSD one einsum of the size of step 4 of :func:`mlgen.ops.ssm.ssd`;
for the selective scan a second pass of ``exp`` over ``[B, T / n, C, S]`` (the local scan's own
per-token states are not exposed). Measured on the 2-core CPU (load 12-15 from other jobs),
forward + backward, float32, 4 simulated devices sharing the cores (so the overhead, not a
speed-up), median of 7: SSD (B=1, T=4096, N=8, H=32, S=64, chunk 128) 1.31 s on one device,
1.20 s (ppermute) / 1.39 s (all_gather) on ``seq=4``; selective scan (C=256, S=16, chunk 64)
7.5 s against 11.4 s / 10.7 s, the extra pass.

The conv: the ``K - 1`` inputs before each shard come from the previous device by one
``ppermute`` of ``[B, K - 1, C]`` (device 0 takes the given ``state``, default zeros).

Everything is plain JAX (``ppermute`` and ``all_gather`` have transposes), so gradients flow
through ``jax.grad``. The mesh axes the batch is split over (``batch_axes``) become manual too;
all other axes (``fsdp``, ``tensor``) stay automatic inside the ``shard_map``. Final states come
back replicated over ``seq`` (what a decoder continuing after a sharded prefill takes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from mlgen.ops import ssm
from mlgen.typing import Array, Bool, Float, Int

F32 = jnp.float32
Exchange = Literal["ppermute", "all_gather"]
EXCHANGES = ("ppermute", "all_gather")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Static description of one call (the cache key of its jitted ``shard_map``)."""

    kind: str  # "ssd" | "selective" | "conv"
    seq_axis: str
    batch_axes: tuple[str, ...]
    n: int
    chunk: int
    exchange: str


def ssd_seq_parallel(
    x: Float[Array, "B T N H"],
    dt: Float[Array, "B T N"],
    a: Float[Array, " N"],
    b: Float[Array, "B T R S"],
    c: Float[Array, "B T R S"],
    d: Float[Array, " N"] | None = None,
    *,
    chunk: int = 256,
    initial_state: Float[Array, "B N H S"] | None = None,
    reset: Bool[Array, "B T"] | None = None,
    seq_axis: str = "seq",
    batch_axes: tuple[str, ...] = (),
    mesh=None,
    exchange: Exchange = "ppermute",
) -> tuple[Float[Array, "B T N H"], Float[Array, "B N H S"]]:
    """:func:`mlgen.ops.ssm.ssd` with T split over mesh axis ``seq_axis``.

    Args:
      x, dt, a, b, c, d, chunk, initial_state, reset: as in :func:`mlgen.ops.ssm.ssd` (global
        shapes; T divisible by the axis size, each device's ``T / n`` need not be a multiple
        of ``chunk``).
      seq_axis: the mesh axis T is split over.
      batch_axes: mesh axes B is split over (manual inside too); other axes stay automatic.
      mesh: a ``Mesh`` / ``AbstractMesh``; default the active one (``jax.set_mesh``).
      exchange: how the states cross devices: ``"ppermute"`` or ``"all_gather"`` (module doc).

    Returns:
      ``(y float32 [B, T, N, H]`` split like x, ``final state [B, N, H, S]`` replicated over
      ``seq_axis``).
    """
    ssm._check_chunk(chunk)
    ssm._heads_per_group(x, b)
    B, T, N, H = x.shape
    state_shape = (B, N, H, b.shape[-1])
    mesh, cfg = _setup("ssd", x, mesh, seq_axis, batch_axes, chunk, exchange)
    h0 = ssm._initial(initial_state, state_shape)
    if cfg.n == 1:
        return ssm.ssd(x, dt, a, b, c, d, chunk=chunk, initial_state=h0, reset=reset)
    return _sharded(mesh, cfg)(x, dt, b, c, reset, a, d, h0)


def selective_scan_seq_parallel(
    x: Float[Array, "B T C"],
    dt: Float[Array, "B T C"],
    a: Float[Array, "C S"],
    b: Float[Array, "B T S"],
    c: Float[Array, "B T S"],
    d: Float[Array, " C"] | None = None,
    *,
    chunk: int = 128,
    initial_state: Float[Array, "B C S"] | None = None,
    reset: Bool[Array, "B T"] | None = None,
    seq_axis: str = "seq",
    batch_axes: tuple[str, ...] = (),
    mesh=None,
    exchange: Exchange = "ppermute",
) -> tuple[Float[Array, "B T C"], Float[Array, "B C S"]]:
    """:func:`mlgen.ops.ssm.selective_scan` with T split over mesh axis ``seq_axis``.

    Arguments and results as in :func:`ssd_seq_parallel` (state ``[B, C, S]``); ``chunk`` is
    also the length of the pieces the entering state's contribution is computed in, so at most
    one ``[B, chunk, C, S]`` block exists at a time.
    """
    ssm._check_chunk(chunk)
    B, T, C = x.shape
    mesh, cfg = _setup("selective", x, mesh, seq_axis, batch_axes, chunk, exchange)
    h0 = ssm._initial(initial_state, (B, C, a.shape[-1]))
    if cfg.n == 1:
        return ssm.selective_scan(x, dt, a, b, c, d, chunk=chunk, initial_state=h0, reset=reset)
    return _sharded(mesh, cfg)(x, dt, b, c, reset, a, d, h0)


def causal_conv1d_seq_parallel(
    x: Float[Array, "B T C"],
    w: Float[Array, "K C"],
    bias: Float[Array, " C"] | None = None,
    state: Float[Array, "B K1 C"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    *,
    seq_axis: str = "seq",
    batch_axes: tuple[str, ...] = (),
    mesh=None,
) -> tuple[Float[Array, "B T C"], Float[Array, "B K1 C"]]:
    """:func:`mlgen.ops.ssm.causal_conv1d` with T split over mesh axis ``seq_axis``.

    Each device takes the ``K - 1`` inputs before its shard (and their segment ids) from the
    previous device by ``ppermute``; device 0 takes ``state`` (default zeros). Needs
    ``T / n >= K - 1``. Returns ``(y`` in x's dtype split like x, ``the last K - 1 inputs``
    replicated over ``seq_axis``).
    """
    B, T, C = x.shape
    K = w.shape[0]
    if state is not None and state.shape != (B, K - 1, C):
        raise ValueError(f"state: expected shape {(B, K - 1, C)}, got {state.shape}")
    mesh, cfg = _setup("conv", x, mesh, seq_axis, batch_axes, 1, "ppermute")
    if cfg.n == 1 or K == 1:
        return ssm.causal_conv1d(x, w, bias, state, segment_ids)
    if T // cfg.n < K - 1:
        raise ValueError(
            f"causal_conv1d_seq_parallel: {T // cfg.n} tokens per device (T={T} over {cfg.n}) "
            f"are fewer than the K - 1 = {K - 1} the kernel w reaches back"
        )
    state = jnp.zeros((B, K - 1, C), x.dtype) if state is None else state
    ids = None if segment_ids is None else segment_ids.astype(jnp.int32)
    return _sharded(mesh, cfg)(x, ids, w, bias, state)


# -- checks and the jitted shard_map --------------------------------------------------------
def _setup(kind, x, mesh, seq_axis, batch_axes, chunk, exchange):
    """The mesh and the static description; every argument error before anything compiles."""
    name = f"{kind}_seq_parallel" if kind != "conv" else "causal_conv1d_seq_parallel"
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or seq_axis not in mesh.axis_names:
        raise ValueError(
            f"{name}: seq_axis={seq_axis!r} is not an axis of the mesh "
            f"{None if mesh is None or mesh.empty else mesh.axis_names} (pass mesh= or use "
            "jax.set_mesh)"
        )
    batch_axes = tuple(batch_axes)
    bad = [ax for ax in batch_axes if ax not in mesh.axis_names or ax == seq_axis]
    if bad:
        raise ValueError(
            f"{name}: batch_axes {bad} must be mesh axes {mesh.axis_names} other than "
            f"seq_axis={seq_axis!r}"
        )
    if exchange not in EXCHANGES:
        raise ValueError(f"{name}: exchange must be one of {EXCHANGES}, got {exchange!r}")
    B, T = x.shape[:2]
    n = mesh.shape[seq_axis]
    if T % n:
        raise ValueError(f"{name}: x length T={T} is not divisible by {seq_axis}={n} devices")
    nb = math.prod(mesh.shape[ax] for ax in batch_axes)
    if B % nb:
        raise ValueError(f"{name}: x batch B={B} is not divisible by {nb} shards of {batch_axes}")
    return mesh, _Static(kind, seq_axis, batch_axes, n, chunk, exchange)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


@functools.lru_cache(maxsize=64)
def _sharded(mesh, cfg: _Static) -> Callable:
    """The op as one jitted ``shard_map`` (cached per static setting). Jitted so that an eager
    call of a partial-manual ``shard_map`` runs (as in ring attention and expert parallelism);
    inside a caller's ``jit`` it is inlined. ``None`` arguments (no ``d`` / ``reset``) are
    empty pytrees, so one spec list serves every combination (jit traces each apart)."""
    bspec, seq = _entry(cfg.batch_axes), cfg.seq_axis
    tokens, rows = P(bspec, seq), P(bspec)
    manual = {seq, *cfg.batch_axes}
    if cfg.kind == "conv":
        body = functools.partial(_conv_body, cfg)
        in_specs = (tokens, tokens, P(), P(), rows)
    else:
        body = functools.partial(_ssd_body if cfg.kind == "ssd" else _selective_body, cfg)
        in_specs = (tokens, tokens, tokens, tokens, tokens, P(), P(), rows)
    return jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=in_specs,
            out_specs=(tokens, rows),
            axis_names=manual,
            check_vma=True,
        )
    )


# -- the per-device bodies ------------------------------------------------------------------
def _first_state(h0, axis):
    """Device 0 starts from the caller's state, every other device from zero (varying)."""
    return jnp.where(lax.axis_index(axis) == 0, h0, jnp.zeros_like(h0))


def _from_shard_start(dt_a, reset):
    """Per token: the log decay from the shard's start (inclusive) and whether no reset came
    since (the entering state still reaches it). ``dt_a [B, Tl, ...]``, ``reset [B, Tl]``."""
    cum = jnp.cumsum(dt_a, axis=1)
    if reset is None:
        return cum, None
    alive = jnp.cumsum(reset.astype(jnp.int32), axis=1) == 0
    return cum, alive


def _ssd_body(cfg: _Static, x, dt, b, c, reset, a, d, h0):
    B, Tl, N, H = x.shape
    R, S = b.shape[2:]
    g = N // R
    h_start = _first_state(h0, cfg.seq_axis)
    y, h_own = ssm.ssd(x, dt, a, b, c, d, chunk=cfg.chunk, initial_state=h_start, reset=reset)
    cum, alive = _from_shard_start(dt.astype(F32) * a.astype(F32), reset)  # [B, Tl, N], [B, Tl]
    keep = None if alive is None else alive[:, -1].astype(F32)
    expand = lambda ld: jnp.exp(ld)[..., None, None]  # noqa: E731  [B, N] -> [B, N, 1, 1]
    h_in, h_end = _scan_devices(cfg, cum[:, -1], keep, h_own, expand)
    weight = jnp.exp(cum) if alive is None else jnp.where(alive[..., None], jnp.exp(cum), 0.0)
    y_in = jnp.einsum(
        "BTRS,BRgHS,BTRg->BTRgH",
        c.astype(F32),
        h_in.reshape(B, R, g, H, S),
        weight.reshape(B, Tl, R, g),
    )
    return y + y_in.reshape(B, Tl, N, H), h_end


def _selective_body(cfg: _Static, x, dt, b, c, reset, a, d, h0):
    B, Tl, C = x.shape
    af = a.astype(F32)
    h_start = _first_state(h0, cfg.seq_axis)
    y, h_own = ssm.selective_scan(
        x, dt, a, b, c, d, chunk=cfg.chunk, initial_state=h_start, reset=reset
    )
    cum, alive = _from_shard_start(dt.astype(F32), reset)  # sum of dt: [B, Tl, C]
    keep = None if alive is None else alive[:, -1].astype(F32)
    expand = lambda ld: jnp.exp(ld[..., None] * af)  # noqa: E731  [B, C] -> [B, C, S]
    h_in, h_end = _scan_devices(cfg, cum[:, -1], keep, h_own, expand)
    alive = jnp.ones((B, Tl), bool) if alive is None else alive
    L = min(cfg.chunk, Tl)
    cums, alives, cs = ssm._pad_to_chunks(L, cum, alive, c.astype(F32))
    nc = cums.shape[1] // L

    @jax.checkpoint
    def piece(_, inputs):  # one [B, L, C, S] block of decays at a time
        cum_l, alive_l, c_l = inputs
        m = jnp.where(alive_l[..., None, None], jnp.exp(cum_l[..., None] * af), 0.0)
        return None, jnp.einsum("BLCS,BCS,BLS->BLC", m, h_in, c_l)

    split = lambda t: jnp.moveaxis(t.reshape(B, nc, L, *t.shape[2:]), 1, 0)  # noqa: E731
    _, y_in = lax.scan(piece, None, tuple(map(split, (cums, alives, cs))))
    y_in = jnp.moveaxis(y_in, 0, 1).reshape(B, nc * L, C)[:, :Tl]
    return y + y_in, h_end


def _scan_devices(cfg: _Static, ld, keep, h, expand):
    """The state entering this device and the global final state (replicated over the axis).

    Device i's tokens map the entering state by ``f_i(h) = keep_i expand(ld_i) h + h_i``
    (``keep_i`` 0 when a reset falls in the shard); device 0's ``h_0`` already holds the
    caller's initial state, so ``h_enter_i = f_{i-1}(... f_0(0))``.
    """
    axis, n = cfg.seq_axis, cfg.n
    i = lax.axis_index(axis)
    keep = jnp.ones(ld.shape[:1], F32) if keep is None else keep
    kb = lambda k: k.reshape(k.shape + (1,) * (h.ndim - 1))  # noqa: E731  [B] -> h's rank

    if cfg.exchange == "all_gather":
        lds, keeps, hs = (lax.all_gather(t, axis) for t in (ld, keep, h))  # [n, ...] each

        def step(acc, inputs):
            ld_j, keep_j, h_j = inputs
            return kb(keep_j) * expand(ld_j) * acc + h_j, acc

        _, entering = lax.scan(step, jnp.zeros_like(hs[0]), (lds, keeps, hs))
        h_in = entering[i]
    else:
        h_in = _doubling_scan(axis, n, ld, keep, h, expand, kb)
    # The global final state: the last device's end state, replicated (every other term of
    # the sum is zero, so it is exact).
    h_end = kb(keep) * expand(ld) * h_in + h
    return h_in, lax.psum(jnp.where(i == n - 1, h_end, jnp.zeros_like(h_end)), axis)


def _doubling_scan(axis, n, ld, keep, h, expand, kb):
    """Hillis-Steele exclusive scan of the maps over the devices: ``1 + ceil(log2 n)`` steps."""
    i = lax.axis_index(axis)

    # A shift by one: device i holds f_{i-1}; device 0 holds the constant map to 0 (keep 0).
    shift = [(j, j + 1) for j in range(n - 1)]
    g_ld, g_keep, g_h = (lax.ppermute(t, axis, shift) for t in (ld, keep, h))
    # Doubling steps: after step k device i holds f_{i-1} o ... o f_{max(i - 2^(k+1), 0)}.
    off = 1
    while off < n:
        perm = [(j, j + off) for j in range(n - off)]
        r_ld, r_keep, r_h = (lax.ppermute(t, axis, perm) for t in (g_ld, g_keep, g_h))
        take = i >= off  # devices below ``off`` already compose down to the constant map
        g_h = jnp.where(take, kb(g_keep) * expand(g_ld) * r_h + g_h, g_h)
        g_ld = jnp.where(take, g_ld + r_ld, g_ld)
        g_keep = jnp.where(take, g_keep * r_keep, g_keep)
        off *= 2
    return g_h


def _conv_body(cfg: _Static, x, ids, w, bias, state):
    axis, n = cfg.seq_axis, cfg.n
    K = w.shape[0]
    B, Tl, C = x.shape
    i = lax.axis_index(axis)
    shift = [(j, j + 1) for j in range(n - 1)]
    halo = lax.ppermute(x[:, Tl - (K - 1) :], axis, shift)
    halo = jnp.where(i == 0, state.astype(x.dtype), halo)
    if ids is None:
        y, _ = ssm.causal_conv1d(x, w, bias, halo)
    else:  # the taps reading another document's token read zero, across devices too
        halo_ids = lax.ppermute(ids[:, Tl - (K - 1) :], axis, shift)
        halo_ids = jnp.where(i == 0, -1, halo_ids)  # the caller's state: no document
        full = jnp.concatenate([halo, x], axis=1)
        full_ids = jnp.concatenate([halo_ids, ids], axis=1)
        y = sum(
            jnp.where((full_ids[:, k : k + Tl] == ids)[..., None], full[:, k : k + Tl], 0)
            * w[k].astype(x.dtype)
            for k in range(K)
        )
        if bias is not None:
            y = y + bias.astype(x.dtype)
    # The global new state: the last device's last K - 1 inputs, summed in float32 (exact:
    # every other term is zero) so that no low-precision all-reduce is needed.
    tail = jnp.where(i == n - 1, x[:, Tl - (K - 1) :].astype(F32), 0.0)
    return y, lax.psum(tail, axis).astype(x.dtype)
