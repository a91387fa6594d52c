"""State-space sequence mixers: the Mamba-2 block's mixer and Mamba's (Jamba's), over
``mlgen.ops.ssm``, each owning its decoding state (:class:`SSMState`).

Both take ``[B, T, D]`` to ``[B, T, D]`` as an attention layer does and sit in the same place in
a block (pre-norm, residual around them); the block adds the norm and the residual.

- :class:`Mamba2` (Dao & Gu 2024): projections to the gate ``z``, the input ``x`` (N heads of H
  channels), ``b`` and ``c`` (R groups of S states) and one ``dt`` per head; a short causal
  depthwise conv (+ SiLU) over ``x``, ``b``, ``c``; SSD (:func:`mlgen.ops.ssm.ssd`) with one decay
  ``a = -exp(a_log)`` per head and the skip ``d``; a gated RMSNorm ``norm(y * silu(z))`` over each
  group's channels; the output projection.
- :class:`Mamba` (Gu & Dao 2023, as Jamba uses it): ``x`` and ``z`` of ``inner`` channels; the
  conv over ``x``; ``dt`` (through a rank-``dt_rank`` bottleneck), ``b`` and ``c`` projected from
  the conv's output (Jamba: each RMS-normalised); the selective scan with a ``[inner, S]`` decay;
  ``y * silu(z)``; the output projection.

The projections are separate ``Linear`` s rather than one fused ``in_proj`` (Hugging Face's
layout; the importer splits it) so each output carries its own logical axes: heads (Mamba-2) or
the inner width (Mamba, named ``mlp``) shard over ``tensor``; the small ``b``, ``c``, ``dt`` rank
and state axes stay replicated.

Padding and packing: tokens with ``segment_ids == 0`` (or a negative position when decoding)
enter the conv as zeros and get ``dt = 0``, so they leave the state untouched; a packed row's
documents start from a zero state (``reset``) and the conv does not reach across them. A
left-padded prompt therefore decodes exactly as the unpadded one.

Sequence parallelism: when the active mesh and rules split the tokens' ``length`` over one mesh
axis (``mesh.seq``, as ring attention does), the conv and the scan run under ``shard_map``
(:mod:`mlgen.ops.ssm_parallel`): each device scans its own tokens and only the chunk-final states
(and the conv's K - 1 halo tokens) cross devices, so a hybrid trains under ``mesh.seq > 1`` with
ring attention in its attention layers.

Decoding: :meth:`init_cache` gives the conv's last ``K - 1`` inputs and the SSM state, whose size
does not depend on the context length; :meth:`decode` runs T new tokens (a prompt by the chunked
op, one token by one recurrence step) and returns the updated state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.nn.core import Linear, RMSNorm, fan_in_init, ones_init, param, zeros_init
from mlgen.nn.moe import shard_axes
from mlgen.ops import ssm as ssm_ops
from mlgen.ops import ssm_parallel
from mlgen.sharding import constrain
from mlgen.typing import Array, Float, Int

F32 = jnp.float32


class SSMState(NamedTuple):
    """One SSM layer's decoding state: ``conv``, the conv's last ``K - 1`` inputs (one array per
    convolved stream), and ``ssm``, the recurrence's state (``[B, N, H, S]`` or ``[B, C, S]``)."""

    conv: tuple[jax.Array, ...]
    ssm: jax.Array


def _dt_bias_init(dt_min: float, dt_max: float, dt_floor: float):
    """``dt_bias`` so that ``softplus(dt_bias)`` is log-uniform in ``[dt_min, dt_max]`` (Mamba)."""

    def init(key, shape, dtype=F32):
        u = jax.random.uniform(key, shape, F32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, dt_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus^-1

    return init


def _a_log_init(n_per_row: int):
    """``log(1 .. n)`` along the last axis (S4D-real): decays ``a = -1 .. -n``."""

    def init(key, shape, dtype=F32):
        del key
        return jnp.broadcast_to(jnp.log(jnp.arange(1, n_per_row + 1, dtype=F32)), shape).astype(
            dtype
        )

    return init


def resets(segment_ids: Int[Array, "B T"] | None):
    """Where a packed row's next document starts (never at token 0), or None."""
    if segment_ids is None:
        return None
    return jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], [(0, 0), (1, 0)])


def _seq_split(B: int, T: int) -> dict | None:
    """The ``ssm_parallel`` keywords when the active mesh splits the length over one axis."""
    split = shard_axes(B, T)
    if split is None or len(split[2]) != 1:
        return None
    return dict(seq_axis=split[2][0], batch_axes=split[1])


def _conv(x, w, bias, state, valid, segment_ids):
    """Causal depthwise conv + SiLU over the trailing feature axes of ``x`` ``[B, T, ...]``."""
    B, T = x.shape[:2]
    feat = x.shape[2:]
    flat = jnp.where(valid[..., None], x.reshape(B, T, -1), 0)
    args = (
        flat,
        w[...].reshape(w.shape[0], -1),
        None if bias is None else bias[...].reshape(-1),
        None if state is None else state.reshape(B, w.shape[0] - 1, -1),
    )
    split = _seq_split(B, T) if state is None else None
    if split is None:
        y, state = ssm_ops.causal_conv1d(*args, segment_ids=segment_ids)
    else:
        y, state = ssm_parallel.causal_conv1d_seq_parallel(*args, segment_ids=segment_ids, **split)
    return jax.nn.silu(y).reshape(B, T, *feat), state.reshape(B, w.shape[0] - 1, *feat)


def _valid(segment_ids, positions, shape):
    if positions is not None:
        return positions >= 0
    if segment_ids is not None:
        return segment_ids > 0
    return jnp.ones(shape, bool)


class Mamba2(nnx.Module):
    """Mamba-2's mixer: ``[B, T, D] -> [B, T, D]`` (see the module docstring)."""

    def __init__(
        self,
        d_model: int,
        *,
        heads: int,
        head_dim: int,
        state: int,
        groups: int = 1,
        conv: int = 4,
        chunk: int = 128,
        use_bias: bool = False,
        conv_bias: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_floor: float = 1e-4,
        norm_eps: float = 1e-5,
        dtype=F32,
        param_dtype=F32,
        rngs: nnx.Rngs,
    ):
        if heads % groups:
            raise ValueError(f"Mamba2: {groups} groups do not divide {heads} heads")
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        emb = ("embed",)
        hh = ("heads", "head_dim")
        self.z = Linear(d_model, (heads, head_dim), in_names=emb, out_names=hh, **kw)
        self.x = Linear(d_model, (heads, head_dim), in_names=emb, out_names=hh, **kw)
        self.b = Linear(d_model, (groups, state), in_names=emb, out_names=(None, None), **kw)
        self.c = Linear(d_model, (groups, state), in_names=emb, out_names=(None, None), **kw)
        self.dt = Linear(d_model, heads, in_names=emb, out_names=("heads",), **kw)
        init = fan_in_init(conv)
        self.conv_x = param(rngs, init, (conv, heads, head_dim), (None, *hh), param_dtype)
        self.conv_b = param(rngs, init, (conv, groups, state), (None, None, None), param_dtype)
        self.conv_c = param(rngs, init, (conv, groups, state), (None, None, None), param_dtype)
        if conv_bias:
            self.conv_x_bias = param(rngs, zeros_init, (heads, head_dim), hh, param_dtype)
            self.conv_b_bias = param(rngs, zeros_init, (groups, state), (None, None), param_dtype)
            self.conv_c_bias = param(rngs, zeros_init, (groups, state), (None, None), param_dtype)
        else:
            self.conv_x_bias = self.conv_b_bias = self.conv_c_bias = None
        # Kept in float32 whatever the parameter dtype: the decay exp(dt * a) is sensitive.
        self.dt_bias = param(rngs, _dt_bias_init(dt_min, dt_max, dt_floor), (heads,), ("heads",))
        self.a_log = param(rngs, _a_log_init(heads), (heads,), ("heads",))
        self.d = param(rngs, ones_init, (heads,), ("heads",))
        self.norm = param(rngs, ones_init, (heads, head_dim), hh, param_dtype)
        self.o = Linear((heads, head_dim), d_model, in_names=hh, out_names=emb, **kw)
        self.groups, self.chunk, self.norm_eps, self.dtype = groups, chunk, norm_eps, dtype
        self.conv_width = conv

    def _mix(self, u, *, valid, segment_ids, cache: SSMState | None):
        B, T, _ = u.shape
        z = self.z(u)
        conv = (None, None, None) if cache is None else cache.conv
        x, cx = _conv(self.x(u), self.conv_x, self.conv_x_bias, conv[0], valid, segment_ids)
        b, cb = _conv(self.b(u), self.conv_b, self.conv_b_bias, conv[1], valid, segment_ids)
        c, cc = _conv(self.c(u), self.conv_c, self.conv_c_bias, conv[2], valid, segment_ids)
        x = constrain(x, ("batch", "length", "act_heads", None))
        dt = jax.nn.softplus(self.dt(u).astype(F32) + self.dt_bias[...].astype(F32))
        dt = jnp.where(valid[..., None], dt, 0.0)
        x = jnp.where(valid[..., None, None], x, 0)
        a = -jnp.exp(self.a_log[...].astype(F32))
        h0 = None if cache is None else cache.ssm
        if cache is not None and T == 1:  # one decoding step: O(1) in the context length
            y, h = ssm_ops.ssd_step(h0, x[:, 0], dt[:, 0], a, b[:, 0], c[:, 0], self.d[...])
            y = y[:, None]
        else:
            split = _seq_split(B, T) if cache is None else None
            scan = ssm_ops.ssd if split is None else ssm_parallel.ssd_seq_parallel
            y, h = scan(
                x,
                dt,
                a,
                b,
                c,
                self.d[...],
                chunk=min(self.chunk, T),
                initial_state=h0,
                reset=resets(segment_ids),
                **(split or {}),
            )
        y = self._gated_norm(y, z)
        out = self.o(constrain(y.astype(self.dtype), ("batch", "length", "act_heads", None)))
        return out, SSMState((cx, cb, cc), h)

    def _gated_norm(self, y, z):
        """RMSNorm of ``y * silu(z)`` over each group's channels (Mamba-2's ``norm_before_gate``
        False), in float32."""
        B, T, N, H = y.shape
        g = (y * jax.nn.silu(z.astype(F32))).reshape(B, T, self.groups, -1)
        g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + self.norm_eps)
        return g.reshape(B, T, N, H) * self.norm[...].astype(F32)

    def __call__(
        self,
        u: Float[Array, "B T D"],
        *,
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
    ) -> Float[Array, "B T D"]:
        del positions  # the recurrence is its own position signal
        valid = _valid(segment_ids, None, u.shape[:2])
        return self._mix(u, valid=valid, segment_ids=segment_ids, cache=None)[0]

    def init_cache(self, batch: int, max_len: int) -> SSMState:
        """The zero state: its size does not depend on ``max_len``."""
        del max_len
        K = self.conv_width
        zeros = lambda w: jnp.zeros((batch, K - 1, *w.shape[1:]), self.dtype)  # noqa: E731
        N, H = self.conv_x.shape[1:]
        S = self.conv_b.shape[2]
        return SSMState(
            (zeros(self.conv_x), zeros(self.conv_b), zeros(self.conv_c)),
            jnp.zeros((batch, N, H, S), F32),
        )

    def decode(
        self, u: Float[Array, "B T D"], positions: Int[Array, "B T"], cache: SSMState
    ) -> tuple[Float[Array, "B T D"], SSMState]:
        """T new tokens per row from ``cache``; negative positions are padding (skipped)."""
        return self._mix(u, valid=positions >= 0, segment_ids=None, cache=cache)


class Mamba(nnx.Module):
    """Mamba's mixer (Jamba's layer): ``[B, T, D] -> [B, T, D]`` (see the module docstring)."""

    def __init__(
        self,
        d_model: int,
        *,
        inner: int,
        state: int,
        dt_rank: int,
        conv: int = 4,
        chunk: int = 128,
        use_bias: bool = False,
        conv_bias: bool = True,
        inner_norms: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_floor: float = 1e-4,
        norm_eps: float = 1e-6,
        dtype=F32,
        param_dtype=F32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        emb, mlp = ("embed",), ("mlp",)
        self.x = Linear(d_model, inner, in_names=emb, out_names=mlp, use_bias=use_bias, **kw)
        self.z = Linear(d_model, inner, in_names=emb, out_names=mlp, use_bias=use_bias, **kw)
        self.conv = param(rngs, fan_in_init(conv), (conv, inner), (None, "mlp"), param_dtype)
        self.conv_bias = param(rngs, zeros_init, (inner,), mlp, param_dtype) if conv_bias else None
        self.dt_in = Linear(inner, dt_rank, in_names=mlp, out_names=(None,), **kw)
        self.b = Linear(inner, state, in_names=mlp, out_names=(None,), **kw)
        self.c = Linear(inner, state, in_names=mlp, out_names=(None,), **kw)
        if inner_norms:  # Jamba's RMSNorms on dt, b and c
            nk = dict(eps=norm_eps, names=(None,), param_dtype=param_dtype, rngs=rngs)
            self.dt_norm = RMSNorm(dt_rank, **nk)
            self.b_norm = RMSNorm(state, **nk)
            self.c_norm = RMSNorm(state, **nk)
        else:
            self.dt_norm = self.b_norm = self.c_norm = None
        self.dt_proj = Linear(
            dt_rank, inner, in_names=(None,), out_names=mlp, init=fan_in_init(dt_rank), **kw
        )
        self.dt_bias = param(rngs, _dt_bias_init(dt_min, dt_max, dt_floor), (inner,), mlp)
        self.a_log = param(rngs, _a_log_init(state), (inner, state), ("mlp", None))
        self.d = param(rngs, ones_init, (inner,), mlp)
        self.o = Linear(inner, d_model, in_names=mlp, out_names=emb, use_bias=use_bias, **kw)
        self.chunk, self.dtype, self.conv_width = chunk, dtype, conv

    def _mix(self, u, *, valid, segment_ids, cache: SSMState | None):
        T = u.shape[1]
        conv = None if cache is None else cache.conv[0]
        x, cx = _conv(self.x(u), self.conv, self.conv_bias, conv, valid, segment_ids)
        x = jnp.where(valid[..., None], constrain(x, ("batch", "length", "act_mlp")), 0)
        dtr, b, c = self.dt_in(x), self.b(x), self.c(x)
        if self.dt_norm is not None:
            dtr, b, c = self.dt_norm(dtr), self.b_norm(b), self.c_norm(c)
        dt = jax.nn.softplus(
            self.dt_proj(dtr).astype(F32) + self.dt_bias[...].astype(F32)
        )  # fmt: skip
        dt = jnp.where(valid[..., None], dt, 0.0)
        a = -jnp.exp(self.a_log[...].astype(F32))
        h0 = None if cache is None else cache.ssm
        if cache is not None and T == 1:
            y, h = ssm_ops.selective_step(h0, x[:, 0], dt[:, 0], a, b[:, 0], c[:, 0], self.d[...])
            y = y[:, None]
        else:
            split = _seq_split(u.shape[0], T) if cache is None else None
            scan = (
                ssm_ops.selective_scan
                if split is None
                else ssm_parallel.selective_scan_seq_parallel
            )
            y, h = scan(
                x,
                dt,
                a,
                b,
                c,
                self.d[...],
                chunk=min(self.chunk, T),
                initial_state=h0,
                reset=resets(segment_ids),
                **(split or {}),
            )
        y = y * jax.nn.silu(self.z(u).astype(F32))
        out = self.o(constrain(y.astype(self.dtype), ("batch", "length", "act_mlp")))
        return out, SSMState((cx,), h)

    def __call__(
        self,
        u: Float[Array, "B T D"],
        *,
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
    ) -> Float[Array, "B T D"]:
        del positions
        valid = _valid(segment_ids, None, u.shape[:2])
        return self._mix(u, valid=valid, segment_ids=segment_ids, cache=None)[0]

    def init_cache(self, batch: int, max_len: int) -> SSMState:
        del max_len
        inner, S = self.a_log.shape
        return SSMState(
            (jnp.zeros((batch, self.conv_width - 1, inner), self.dtype),),
            jnp.zeros((batch, inner, S), F32),
        )

    def decode(
        self, u: Float[Array, "B T D"], positions: Int[Array, "B T"], cache: SSMState
    ) -> tuple[Float[Array, "B T D"], SSMState]:
        return self._mix(u, valid=positions >= 0, segment_ids=None, cache=cache)
