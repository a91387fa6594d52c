"""A Pallas Mosaic (TPU) kernel for Mamba-2's SSD: every chunk's work and the state passing.

Same contract as :func:`mlgen.ops.ssm.ssd` (which calls it for ``impl="pallas"``, and for
``impl="auto"`` when compiling for TPU). One kernel does all four steps of the chunked
algorithm for a block of heads of one batch row, chunk after chunk:

1. ``y = (c b^T * decay mask) (dt x)`` inside the chunk: the ``[L, L]`` scores ``c b^T`` are
   computed once per block of heads (they share the b/c group) and the ``[L, L]`` decay mask
   ``exp(cum_l - cum_s)`` once per head, both only in VMEM, never in HBM;
2. the entering state's contribution ``exp(cum_l) c_l . h_start``, and the skip ``d x``;
3. the chunk's own final state ``sum_s exp(cum_end - cum_s) (dt x)_s b_s^T``;
4. the state passing ``h <- exp(cum_end) h + own``, in a VMEM scratch carried along the
   innermost grid axis (the chunks, ``arbitrary``: sequential on one core), from
   ``initial_state`` at chunk 0 to the final state written at the last chunk.

So the sequence is read once and ``y`` written once, in ``x``'s own ``[B, T, N * H]`` layout (a
block of heads is a lane slice: no transposes in HBM), with no ``[B, nc, N, H, S]`` chunk states
in HBM and no separate ``lax.scan`` (the jnp path has both). Grid: ``(B, N / block_heads, nc)``;
the batch and head-block axes are ``parallel`` (megacore). ``cum`` (the within-chunk cumulative
``dt * a``) and ``dt`` are computed in JAX and come as lane-dense ``[heads, L]`` rows; the
kernel takes the columns it needs off the diagonal of a broadcast (no Mosaic transposes). The
mask uses differences of ``cum`` (as the Mamba authors' kernels do), where the jnp path sums
the masked terms: for a chunk whose decays add up to ``|cum|`` the exponent's rounding is
``~|cum| * 6e-8`` (relative error ``6e-6`` at ``|cum| = 100``).

Why TPU (Mosaic) first: GPU users already have the Mamba authors' Triton kernels (and
``mamba_ssm``); TPU pods have nothing but XLA's fused einsums, which write the ``[L, L]``
masks and the per-chunk states to HBM. From this CPU the kernel is also checked by the real
TPU compiler (libtpu ahead of time, any topology), where a GPU kernel can only be lowered.

Gradients: a ``jax.custom_vjp`` whose backward is the VJP of the jnp chunked path (it
recomputes the forward in XLA); no Pallas backward yet. Under a mesh of several devices the
kernel runs per shard in ``shard_map`` (XLA cannot partition a Mosaic call): batch split over
the mesh axes other than ``seq`` and ``tensor`` as far as they divide it, heads (with ``a``,
``d`` and the b/c groups when there are several) over ``tensor`` when it divides them, the rest
replicated (a ``seq``-sharded T is gathered: sequence-parallel state passing is another path).

bfloat16 inputs feed the MXU as bfloat16 (scores, masked scores and ``dt x`` cast like flash
attention's probabilities) with float32 accumulation; float32 inputs use float32 matmuls at
HIGHEST precision. On CPU the kernel runs in the Mosaic interpreter (``interpret=True``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from mlgen.ops.platform import target_platform
from mlgen.typing import Array, Bool, Float

F32 = jnp.float32
IMPLS = ("auto", "xla", "pallas")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tunables of the SSD kernel (the chunk length is ``ssd``'s own ``chunk``).

    Attributes:
      block_heads: heads per grid step, all of one b/c group: they share the ``[L, L]`` scores
        ``c b^T`` and one fetch of the chunk's b and c. Clamped to the largest divisor of the
        heads per group that is not larger and (compiled for TPU) spans a multiple of 128 lanes
        of ``x``'s ``N * H`` (or all of them). 8 heads of ``L=256, H=64, S=128`` keep about
        5 MiB in VMEM (x, y double-buffered; the states and their scratch; a few ``[L, L]``
        tiles), inside v5e's 16 MiB default scoped limit.
    """

    block_heads: int = 8

    def __post_init__(self):
        if not isinstance(self.block_heads, int) or self.block_heads <= 0:
            raise ValueError(
                f"BlockSizes.block_heads must be a positive int, got {self.block_heads!r}"
            )


def unsupported(
    x, b, c, chunk: int, interpret: bool = False, block_sizes: BlockSizes | None = None
) -> str | None:
    """Why the kernel cannot run these inputs (None if it can); the interpreter takes any block
    of heads. Any ``chunk`` runs (see :func:`_config`)."""
    del chunk
    for name, t in (("x", x), ("b", b), ("c", c)):
        if jnp.dtype(t.dtype) not in _DTYPES:
            return f"the SSD kernel takes float32/bfloat16 {name}, got {t.dtype}"
    N, H, R = x.shape[2], x.shape[3], b.shape[2]
    if N % R == 0 and _heads_per_step(block_sizes or BlockSizes(), N, R, H, interpret) is None:
        return (
            f"the SSD kernel finds no block of heads within a b/c group ({N // R} heads of "
            f"H={H}) spanning a multiple of 128 lanes on TPU"
        )
    return None


def _heads_per_step(bs: BlockSizes, N: int, R: int, H: int, interpret: bool) -> int | None:
    """The largest divisor of the heads per group within ``bs.block_heads`` whose lanes the TPU
    can block (a multiple of 128, or all ``N * H``); None when there is none."""
    g = N // R
    fits = [k for k in range(1, g + 1) if g % k == 0]
    if not interpret:
        fits = [k for k in fits if (k * H) % 128 == 0 or k == N]
    within = [k for k in fits if k <= bs.block_heads]
    return max(within) if within else (min(fits) if fits else None)


def use_kernel(impl: str, interpret: bool, chunk: int, x, b, c) -> bool:
    """Whether ``ssd(impl=...)`` runs this kernel (``True``) or the jnp path (``False``).

    ``"auto"``: the kernel when the call is compiled for TPU (:func:`target_platform`: the
    inputs' devices or the mesh, so an ahead-of-time TPU plan on a CPU host counts) and it takes
    the inputs; the jnp path otherwise. ``"pallas"``: the kernel, or a one-line error saying why
    not (not a TPU and not ``interpret``; dtype; no block of heads fits the lanes).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: must be one of {IMPLS}, got {impl!r}")
    if impl == "xla":
        return False
    platform, known = target_platform(x, b, c)
    if impl == "auto":
        return platform == "tpu" and unsupported(x, b, c, chunk, interpret) is None
    if platform != "tpu" and known and not interpret:
        raise ValueError(
            f"impl: 'pallas' is a TPU (Mosaic) kernel and the platform is {platform}; "
            "pass interpret=True to run it in the Mosaic interpreter"
        )
    why = unsupported(x, b, c, chunk, interpret)
    if why is not None:
        raise ValueError(f"impl: {why}")
    return True


@dataclasses.dataclass(frozen=True)
class _Config:
    L: int  # chunk length
    nc: int  # chunks
    nh: int  # heads per grid step
    g: int  # heads per b/c group
    has_reset: bool
    compute_dtype: jnp.dtype  # MXU operand dtype
    interpret: bool


def ssd(
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
    recompute: Callable,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B N H S"]]:
    """Mamba-2's SSD by the Mosaic kernel: ``(y float32 [B, T, N, H], final state [B, N, H, S])``.

    Args:
      x, dt, a, b, c, d, chunk, initial_state, reset: as :func:`mlgen.ops.ssm.ssd`. The kernel's
        chunk is ``min(chunk, T)`` rounded up to a multiple of 8 (the same result).
      recompute: the jnp chunked SSD with ``mlgen.ops.ssm.ssd``'s signature; the backward pass
        is its VJP. Passed in because ``mlgen.ops.ssm`` imports this module
        (``ssm.ssd(impl="pallas")`` is the usual entry).
      interpret: run in the Mosaic interpreter (CPU).
      block_sizes: :class:`BlockSizes` (default: ``BlockSizes()``).

    Returns:
      ``(y, final_state)``, both float32.
    """
    B, T, N, H = x.shape
    R, S = b.shape[2], b.shape[3]
    if chunk <= 0:
        raise ValueError(f"chunk: must be > 0, got {chunk}")
    if N % R:
        raise ValueError(f"ssd: {R} b/c groups do not divide {N} heads")
    if initial_state is not None and initial_state.shape != (B, N, H, S):
        raise ValueError(f"initial_state: expected shape {(B, N, H, S)}, got {initial_state.shape}")
    why = unsupported(x, b, c, chunk, interpret, block_sizes)
    if why is not None:
        raise ValueError(why)
    h0 = jnp.zeros((B, N, H, S), F32) if initial_state is None else initial_state.astype(F32)
    d = jnp.zeros((N,), F32) if d is None else d  # the skip term is fused into the kernel

    def run(x, dt, a, b, c, d, h0, reset):  # all of the inputs, or one shard's
        cfg = _config(x, b, c, chunk, reset is not None, interpret, block_sizes or BlockSizes())
        return _differentiable(cfg, chunk, recompute)(x, dt, a, b, c, d, h0, reset)

    if interpret:
        return run(x, dt, a, b, c, d, h0, reset)
    return _per_shard(run, x, dt, a, b, c, d, h0, reset)


def _config(x, b, c, chunk, has_reset, interpret, bs: BlockSizes) -> _Config:
    """The static kernel config for these (per-shard) shapes."""
    T, N, H = x.shape[1:]
    R = b.shape[2]
    nh = _heads_per_step(bs, N, R, H, interpret)
    if nh is None:  # only per shard: the full shapes were checked by ``unsupported``
        raise ValueError(
            f"the SSD kernel finds no block of heads within a b/c group ({N // R} heads of "
            f"H={H} per shard) spanning a multiple of 128 lanes on TPU"
        )
    # The chunk length only moves rounding (every chunking computes the same recurrence), so
    # it is rounded up to the 8 sublanes Mosaic tiles by: min(chunk, T) = 13 runs as 16.
    L = -(-min(chunk, T) // 8) * 8
    all_bf16 = all(t.dtype == jnp.bfloat16 for t in (x, b, c))
    return _Config(
        L=L,
        nc=-(-T // L),
        nh=nh,
        g=N // R,
        has_reset=has_reset,
        compute_dtype=jnp.dtype(jnp.bfloat16 if all_bf16 else F32),
        interpret=bool(interpret),
    )


def _differentiable(cfg: _Config, chunk: int, recompute: Callable):
    """The kernel with the jnp path's VJP as its backward (a fresh ``custom_vjp`` per config)."""

    @jax.custom_vjp
    def core(x, dt, a, b, c, d, h0, reset):
        return _forward(cfg, x, dt, a, b, c, d, h0, reset)

    def fwd(x, dt, a, b, c, d, h0, reset):
        return core(x, dt, a, b, c, d, h0, reset), (x, dt, a, b, c, d, h0, reset)

    def bwd(res, cts):
        x, dt, a, b, c, d, h0, reset = res

        def jnp_path(x, dt, a, b, c, d, h0):
            return recompute(x, dt, a, b, c, d, chunk=chunk, initial_state=h0, reset=reset)

        _, vjp = jax.vjp(jnp_path, x, dt, a, b, c, d, h0)
        return (*vjp(cts), None)

    core.defvjp(fwd, bwd)
    return core


def _per_shard(fn, x, dt, a, b, c, d, h0, reset):
    """``fn`` once per shard when a mesh of several devices is active (see the module doc)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty:
        return fn(x, dt, a, b, c, d, h0, reset)
    types = getattr(mesh, "axis_types", (AxisType.Auto,) * len(mesh.axis_names))
    free = [n for n, t in zip(mesh.axis_names, types) if t != AxisType.Manual]
    if math.prod(mesh.shape[n] for n in free) == 1:
        return fn(x, dt, a, b, c, d, h0, reset)
    N, R = x.shape[2], b.shape[2]
    batch: list[str] = []
    for n in free:  # the longest run of other axes whose sizes multiply to a divisor of B
        if n in ("seq", "tensor"):
            continue
        if x.shape[0] % (math.prod(mesh.shape[m] for m in batch) * mesh.shape[n]):
            break
        batch.append(n)
    heads = None  # heads over "tensor" when it divides them and the groups (or there is one)
    if "tensor" in free and mesh.shape["tensor"] > 1:
        k = mesh.shape["tensor"]
        if N % k == 0 and (R == 1 or R % k == 0):
            heads = "tensor"
    bt = tuple(batch) if batch else None
    groups = heads if R > 1 else None
    specs = (
        P(bt, None, heads, None),  # x
        P(bt, None, heads),  # dt
        P(heads),  # a
        P(bt, None, groups, None),  # b
        P(bt, None, groups, None),  # c
        P(heads),  # d
        P(bt, heads, None, None),  # initial state
    )
    has_reset = reset is not None

    def body(x, dt, a, b, c, d, h0, *maybe_reset):
        return fn(x, dt, a, b, c, d, h0, maybe_reset[0] if has_reset else None)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=specs + (P(bt, None),) * has_reset,
        out_specs=(specs[0], specs[-1]),
        axis_names=set(free),
        check_vma=False,
    )(x, dt, a, b, c, d, h0, *((reset,) if has_reset else ()))


def _forward(cfg: _Config, x, dt, a, b, c, d, h0, reset):
    """Lays the inputs out by chunk, runs the kernel, lays ``y`` back out: ``(y, h_end)``.

    ``x`` and ``y`` keep their ``[B, T, N * H]`` layout (chunks by reshape, no transpose; a head
    block is a lane slice); ``dt`` and ``cum`` go head-major as ``[nh, L]`` rows per head block
    and chunk, lane-dense in HBM (a ``[L, 1]`` column would pad to 128 lanes).
    """
    B, T, N, H = x.shape
    R, S = b.shape[2], b.shape[3]
    L, nc, nh = cfg.L, cfg.nc, cfg.nh
    Tp = nc * L

    def chunks(t):  # [B, T, ...] -> [B, nc, L, ...], zero padded (a zero dt adds nothing)
        t = jnp.pad(t, [(0, 0), (0, Tp - T)] + [(0, 0)] * (t.ndim - 2))
        return t.reshape(B, nc, L, *t.shape[2:])

    xs = chunks(x).reshape(B, nc, L, N * H)
    bs = jnp.moveaxis(chunks(b), 3, 1)  # [B, R, nc, L, S]
    cs = jnp.moveaxis(chunks(c), 3, 1)
    dts = chunks(dt.astype(F32))  # [B, nc, L, N]
    cum = jnp.cumsum(dts * a.astype(F32), axis=2)

    def rows(t):  # [B, nc, L, N] -> [B, N / nh, nc, nh, L]
        return jnp.moveaxis(t, 2, 3).reshape(B, nc, N // nh, nh, L).swapaxes(1, 2)

    d_lanes = jnp.repeat(d.astype(F32), H)[None, :]  # [1, N * H]: each head's d on its lanes
    args = [xs, rows(dts), rows(cum), bs, cs, d_lanes, h0]
    if cfg.has_reset:
        doc = jnp.cumsum(chunks(reset.astype(jnp.int32)), axis=-1)  # [B, nc, L]
        args.append(doc[:, :, None, :])
    y, h = _call(cfg, B, N, H, R, S, args)
    return y.reshape(B, Tp, N, H)[:, :T], h


def _call(cfg: _Config, B: int, N: int, H: int, R: int, S: int, args):
    L, nc, nh, g = cfg.L, cfg.nc, cfg.nh, cfg.g
    del R

    def lanes(b, hb, ci):
        return b, ci, 0, hb

    def rows(b, hb, ci):
        return b, hb, ci, 0, 0

    def group(b, hb, ci):
        return b, lax.div(hb * nh, g), ci, 0, 0

    def state(b, hb, ci):
        return b, hb, 0, 0

    in_specs = [
        pl.BlockSpec((None, None, L, nh * H), lanes),  # x
        pl.BlockSpec((None, None, None, nh, L), rows),  # dt
        pl.BlockSpec((None, None, None, nh, L), rows),  # cum
        pl.BlockSpec((None, None, None, L, S), group),  # b
        pl.BlockSpec((None, None, None, L, S), group),  # c
        pl.BlockSpec((1, nh * H), lambda b, hb, ci: (0, hb)),  # d, on x's lanes
        pl.BlockSpec((None, nh, H, S), state),  # initial state
    ]
    if cfg.has_reset:
        in_specs.append(pl.BlockSpec((None, None, 1, L), lambda b, hb, ci: (b, ci, 0, 0)))
    out_specs = [
        pl.BlockSpec((None, None, L, nh * H), lanes),
        pl.BlockSpec((None, nh, H, S), state),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, nc, L, N * H), F32),
        jax.ShapeDtypeStruct((B, N, H, S), F32),
    ]
    if cfg.interpret:
        kw = dict(interpret=pltpu.InterpretParams())
    else:
        sem = (pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)
        kw = dict(
            compiler_params=pltpu.CompilerParams(dimension_semantics=sem),
            cost_estimate=_cost(cfg, B, N, H, S, args, out_shape),
        )
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, H=H),
        grid=(B, N // nh, nc),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((nh, H, S), F32)],
        name="mlgen_tpu_ssd",
        **kw,
    )(*args)


def _cost(cfg: _Config, B, N, H, S, args, out_shape) -> pl.CostEstimate:
    """The kernel's work for XLA's cost analysis (a Mosaic call is opaque to it): per chunk,
    the scores once per head block, then per head the masked ``[L, L] x [L, H]`` product and
    two ``L x H x S`` products (entering state, own state; 2 FLOPs a multiply-add)."""
    L, nc = cfg.L, cfg.nc
    per_head = 2 * L * L * H + 2 * 2 * L * H * S
    flops = B * nc * (N // cfg.nh * 2 * L * L * S + N * per_head)
    moved = sum(t.size * t.dtype.itemsize for t in args)
    moved += sum(math.prod(o.shape) * jnp.dtype(o.dtype).itemsize for o in out_shape)
    return pl.CostEstimate(
        flops=int(flops),
        transcendentals=int(B * nc * N * (L * L + 2 * L)),
        bytes_accessed=int(moved),
    )


def _dot(a, b, contract):
    """A 2-D matmul with float32 accumulation; ``contract`` names the contracted dims."""
    both_f32 = a.dtype == F32 and b.dtype == F32
    return lax.dot_general(
        a,
        b,
        (contract, ((), ())),
        precision=lax.Precision.HIGHEST if both_f32 else lax.Precision.DEFAULT,
        preferred_element_type=F32,
    )


_NN, _NT, _TN = ((1,), (0,)), ((1,), (1,)), ((0,), (0,))


def _kernel(*refs, cfg: _Config, H: int):
    if cfg.has_reset:
        x_ref, dt_ref, cum_ref, b_ref, c_ref, d_ref, h0_ref, doc_ref = refs[:8]
    else:
        x_ref, dt_ref, cum_ref, b_ref, c_ref, d_ref, h0_ref = refs[:7]
    y_ref, h_ref, h_sc = refs[-3:]
    L, cd = cfg.L, cfg.compute_dtype
    ci = pl.program_id(2)

    @pl.when(ci == 0)
    def _start():
        h_sc[...] = h0_ref[...].astype(F32)

    row = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    col = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    diagonal, keep = row == col, row >= col
    last_lane = lax.broadcasted_iota(jnp.int32, (1, L), 1) == L - 1

    def column(r):  # [1, L] -> [L, 1] through the diagonal: no transpose in Mosaic
        return jnp.sum(jnp.where(diagonal, r, 0), axis=1, keepdims=True)

    def at_last(r):  # [1, L] -> [1, 1]: the chunk's last entry
        return jnp.sum(jnp.where(last_lane, r, 0), axis=1, keepdims=True)

    bm, cm = b_ref[...].astype(cd), c_ref[...].astype(cd)
    scores = _dot(cm, bm, _NT)  # [L, L], shared by the heads of the block
    if cfg.has_reset:  # document index within the chunk (0: the one the chunk started in)
        doc_r = doc_ref[...]
        doc_c, doc_last = column(doc_r), at_last(doc_r)
        keep = keep & (doc_c == doc_r)

    for j in range(cfg.nh):  # static: lane offsets j * H, row j
        x = x_ref[:, j * H : (j + 1) * H].astype(cd)  # [L, H]
        dt_r, cum_r = dt_ref[j : j + 1, :], cum_ref[j : j + 1, :]  # [1, L]
        cum_c, dt_c, cum_last = column(cum_r), column(dt_r), at_last(cum_r)
        mask = jnp.exp(jnp.where(keep, cum_c - cum_r, -jnp.inf)) * dt_r  # decay, then dt_s
        y = _dot((scores * mask).astype(cd), x, _NN)
        h = h_sc[j]  # [H, S]: the state entering this chunk
        from_start = jnp.exp(cum_c)  # [L, 1]
        to_end = dt_c * jnp.exp(cum_last - cum_c)  # [L, 1]
        total = jnp.exp(cum_last)  # [1, 1]
        if cfg.has_reset:
            from_start = jnp.where(doc_c == 0, from_start, 0.0)
            to_end = jnp.where(doc_c == doc_last, to_end, 0.0)
            total = jnp.where(doc_last == 0, total, 0.0)
        y = y + from_start * _dot(cm, h.astype(cd), _NT)
        skip = d_ref[:, j * H : (j + 1) * H] * x_ref[:, j * H : (j + 1) * H].astype(F32)
        y_ref[:, j * H : (j + 1) * H] = y + skip
        own = _dot(x, (bm.astype(F32) * to_end).astype(cd), _TN)  # [H, S]
        h_sc[j] = total * h + own

    @pl.when(ci == cfg.nc - 1)
    def _finish():
        h_ref[...] = h_sc[...]
