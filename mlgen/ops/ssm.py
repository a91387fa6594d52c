"""State-space sequence mixers as pure array functions: Mamba-2's SSD and Mamba's selective scan.

Both are the same linear recurrence over a hidden state ``h``, run per batch row:

    h_t = exp(dt_t * a) * h_{t-1} + dt_t * x_t (outer) b_t
    y_t = h_t . c_t + d * x_t

with an input-dependent step ``dt_t > 0`` (already through the layer's softplus), a negative
``a``, and input-dependent ``b_t``, ``c_t`` (what makes the model "selective"). They differ in the
shapes:

- **SSD** (Mamba-2, Dao & Gu 2024): ``x [B, T, N, H]`` (N heads of H channels), one scalar
  ``a`` and one ``dt`` per head, ``b``, ``c`` ``[B, T, R, S]`` shared by the heads of each of R
  groups (as grouped-query attention shares K/V), state ``[B, N, H, S]``. A scalar decay per head
  makes the recurrence a masked matmul (the state-space *duality*): :func:`ssd` splits the
  sequence into chunks, computes each chunk's outputs as attention-like matmuls with the
  decay mask, and passes the chunk-final states from chunk to chunk with a ``lax.scan``.
- **Selective scan** (Mamba, Gu & Dao 2023; Jamba's layer): ``x [B, T, C]`` channels, each with
  its own ``dt`` and its own diagonal ``a [C, S]``, ``b``, ``c`` ``[B, T, S]`` shared by all
  channels, state ``[B, C, S]``. A per-state decay has no matmul form; :func:`selective_scan`
  runs an associative scan inside each chunk (rematerialised in the backward pass, so at most one
  chunk's ``[B, L, C, S]`` states exist at a time) and a ``lax.scan`` across chunks.

Letters (``mlgen.typing``'s alphabet plus these): N heads, H head dim, R groups of b/c,
S state size, C channels, K conv width. The step-by-step recurrences :func:`ssd_reference` and
:func:`selective_scan_reference` are the spec; :func:`ssd_step` / :func:`selective_step` are
one decoding step of each (the same update the references loop over). :func:`causal_conv1d` is
the short depthwise convolution both Mamba blocks put in front of the scan, with the carried
state a decoder needs.

Padding: a token with ``dt = 0`` and ``x = 0`` leaves the state exactly as it was (its decay is
``exp(0) = 1`` and it adds nothing), which is how the layers skip padding and how a length that
is not a multiple of the chunk is padded here. All accumulation is in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mlgen.ops import ssm_pallas
from mlgen.typing import Array, Bool, Float, Int

F32 = jnp.float32


def _check_chunk(chunk: int) -> None:
    if chunk <= 0:
        raise ValueError(f"chunk: must be > 0, got {chunk}")


def _heads_per_group(x, b) -> int:
    n, r = x.shape[2], b.shape[2]
    if n % r:
        raise ValueError(f"ssd: {r} b/c groups do not divide {n} heads")
    return n // r


# -- Mamba-2 SSD ----------------------------------------------------------------------------
def ssd_step(
    state: Float[Array, "B N H S"],
    x: Float[Array, "B N H"],
    dt: Float[Array, "B N"],
    a: Float[Array, " N"],
    b: Float[Array, "B R S"],
    c: Float[Array, "B R S"],
    d: Float[Array, " N"] | None = None,
    reset: Bool[Array, " B"] | None = None,
) -> tuple[Float[Array, "B N H"], Float[Array, "B N H S"]]:
    """One token of the SSD recurrence: ``(y, new_state)``; ``reset`` rows start from zero."""
    g = x.shape[1] // b.shape[1]
    b, c = jnp.repeat(b.astype(F32), g, axis=1), jnp.repeat(c.astype(F32), g, axis=1)
    x, dt = x.astype(F32), dt.astype(F32)
    decay = jnp.exp(dt * a.astype(F32))[..., None, None]
    if reset is not None:
        decay = jnp.where(reset[:, None, None, None], 0.0, decay)
    state = decay * state + (dt[..., None] * x)[..., None] * b[:, :, None, :]
    y = jnp.einsum("BNHS,BNS->BNH", state, c)
    if d is not None:
        y = y + d.astype(F32)[:, None] * x
    return y, state


def ssd_reference(
    x: Float[Array, "B T N H"],
    dt: Float[Array, "B T N"],
    a: Float[Array, " N"],
    b: Float[Array, "B T R S"],
    c: Float[Array, "B T R S"],
    d: Float[Array, " N"] | None = None,
    initial_state: Float[Array, "B N H S"] | None = None,
    reset: Bool[Array, "B T"] | None = None,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B N H S"]]:
    """The SSD recurrence one token at a time (the spec): ``(y float32, final state)``."""
    _heads_per_group(x, b)
    B, T, N, H = x.shape
    state = _initial(initial_state, (B, N, H, b.shape[-1]))
    reset = jnp.zeros((B, T), bool) if reset is None else reset

    def step(h, inputs):
        xt, dtt, bt, ct, rt = inputs
        y, h = ssd_step(h, xt, dtt, a, bt, ct, d, rt)
        return h, y

    swap = lambda t: jnp.swapaxes(t, 0, 1)  # noqa: E731  (scan over T)
    state, y = jax.lax.scan(step, state, tuple(map(swap, (x, dt, b, c, reset))))
    return swap(y), state


def _initial(initial_state, shape):
    if initial_state is None:
        return jnp.zeros(shape, F32)
    if initial_state.shape != shape:
        raise ValueError(f"initial_state: expected shape {shape}, got {initial_state.shape}")
    return initial_state.astype(F32)


def _pad_to_chunks(chunk: int, *arrays):
    """Pads axis 1 (T) of each array with zeros up to a multiple of ``chunk``."""
    T = arrays[0].shape[1]
    pad = -T % chunk
    if not pad:
        return arrays
    return tuple(jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) for t in arrays)


def _segsum(a: Float[Array, "... L"]) -> Float[Array, "... L L"]:
    """``out[..., l, s] = a[s+1] + ... + a[l]`` for ``s <= l`` (0 on the diagonal), ``-inf`` above.

    Summed from the masked terms themselves rather than as a difference of two cumulative sums,
    which loses the small sums of a long chunk to cancellation.
    """
    L = a.shape[-1]
    k = jnp.arange(L)
    terms = jnp.where(k[:, None] > k[None, :], a[..., :, None], 0.0)  # [..., k, s]: k > s
    sums = jnp.cumsum(terms, axis=-2)  # [..., l, s] = sum_{s < k <= l} a_k
    return jnp.where(k[:, None] >= k[None, :], sums, -jnp.inf)


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
    impl: str = "auto",
    interpret: bool = False,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B N H S"]]:
    """Mamba-2's chunked SSD: ``(y float32 [B, T, N, H], final state [B, N, H, S])``.

    Equal to :func:`ssd_reference`. Per chunk of ``chunk`` tokens (T need not be a multiple):

    1. inside the chunk, ``y = (c b^T * decay mask) (dt x)``: an ``[L, L]`` score matrix per
       group, masked by ``exp`` of the segment sums of ``dt * a`` per head;
    2. each chunk's own final state, ``sum_s exp(decay from s to the end) dt_s x_s b_s^T``;
    3. a ``lax.scan`` over chunks carries the state across them (from ``initial_state``);
    4. each token adds ``c_t . (exp(decay since the chunk start) h_start)``.

    The work is ``O(T L)`` for 1 and ``O(T S H)`` for the rest, matmuls throughout; memory
    ``O(T L)`` for the masks (``chunk``: 64-256 is the usual range).

    ``reset`` ``[B, T]``: the state is zeroed just before each marked token (a packed row's
    document starts), so nothing crosses a document boundary. Inside a chunk that is a mask on
    pairs in different documents, exactly as attention's ``segment_ids`` mask; the decays stay
    finite (no ``-inf`` differences).

    ``impl``: ``"xla"`` (this jnp code), ``"pallas"`` (:mod:`mlgen.ops.ssm_pallas`, a TPU
    Mosaic kernel; its backward is this code's VJP), ``"auto"`` (the kernel when compiling for
    TPU and it takes the inputs, else xla). ``interpret``: run the kernel in the Mosaic
    interpreter (CPU tests).
    """
    if ssm_pallas.use_kernel(impl, interpret, chunk, x, b, c):
        xla = functools.partial(ssd, impl="xla")
        return ssm_pallas.ssd(
            x, dt, a, b, c, d, chunk=chunk, initial_state=initial_state, reset=reset,
            recompute=xla, interpret=interpret,
        )  # fmt: skip
    _check_chunk(chunk)
    g = _heads_per_group(x, b)
    B, T, N, H = x.shape
    R, S = b.shape[2], b.shape[3]
    h0 = _initial(initial_state, (B, N, H, S))
    reset = jnp.zeros((B, T), bool) if reset is None else reset
    xs, dts, bs, cs, rs = _pad_to_chunks(chunk, x.astype(F32), dt.astype(F32), b, c, reset)
    nc = xs.shape[1] // chunk
    # Document index of each token within its chunk (0 = the document the chunk started in).
    doc = jnp.cumsum(rs.reshape(B, nc, 1, 1, chunk).astype(jnp.int32), axis=-1)
    # [B, nc, L, ...] chunks; heads split into (R groups, g heads per group).
    xs = xs.reshape(B, nc, chunk, R, g, H)
    dts = dts.reshape(B, nc, chunk, R, g)
    bs = bs.astype(F32).reshape(B, nc, chunk, R, S)
    cs = cs.astype(F32).reshape(B, nc, chunk, R, S)
    da = dts * a.astype(F32).reshape(R, g)  # [B, nc, L, R, g], <= 0
    da = jnp.moveaxis(da, 2, -1)  # [B, nc, R, g, L]
    cum = jnp.cumsum(da, axis=-1)
    xdt = xs * dts[..., None]

    # 1. Within each chunk: attention-like scores c_l . b_s, masked by the decay from s to l.
    scores = jnp.einsum("BclRS,BcsRS->BcRls", cs, bs)
    same = doc[..., :, None] == doc[..., None, :]
    mask = jnp.exp(jnp.where(same, _segsum(da), -jnp.inf))  # [B, nc, R, g, l, s]
    y_diag = jnp.einsum("BcRls,BcRgls,BcsRgH->BclRgH", scores, mask, xdt)

    # 2. Each chunk's final state from its own tokens.
    to_end = jnp.where(doc == doc[..., -1:], jnp.exp(cum[..., -1:] - cum), 0.0)  # [B,nc,R,g,L]
    states = jnp.einsum("BclRS,BcRgl,BclRgH->BcRgHS", bs, to_end, xdt)

    # 3. Pass states across chunks: h_end(c) = exp(total decay of c) h_end(c-1) + states(c).
    total = jnp.where(doc[..., -1] == 0, jnp.exp(cum[..., -1]), 0.0)  # [B, nc, R, g]

    def carry(h, inputs):
        decay, own = inputs
        start = h
        return decay[..., None, None] * h + own, start

    h_end, starts = jax.lax.scan(
        carry,
        h0.reshape(B, R, g, H, S),
        (jnp.moveaxis(total, 1, 0), jnp.moveaxis(states, 1, 0)),
    )
    starts = jnp.moveaxis(starts, 0, 1)  # [B, nc, R, g, H, S]: the state entering each chunk

    # 4. The entering state's contribution, decayed to each token.
    from_start = jnp.where(doc == 0, jnp.exp(cum), 0.0)  # [B, nc, R, g, L]
    y_off = jnp.einsum("BclRS,BcRgHS,BcRgl->BclRgH", cs, starts, from_start)

    y = (y_diag + y_off).reshape(B, nc * chunk, N, H)[:, :T]
    if d is not None:
        y = y + d.astype(F32)[:, None] * x.astype(F32)
    return y, h_end.reshape(B, N, H, S)


# -- Mamba selective scan -------------------------------------------------------------------
def selective_step(
    state: Float[Array, "B C S"],
    x: Float[Array, "B C"],
    dt: Float[Array, "B C"],
    a: Float[Array, "C S"],
    b: Float[Array, "B S"],
    c: Float[Array, "B S"],
    d: Float[Array, " C"] | None = None,
    reset: Bool[Array, " B"] | None = None,
) -> tuple[Float[Array, "B C"], Float[Array, "B C S"]]:
    """One token of Mamba's selective scan: ``(y, new_state)``; ``reset`` rows start from zero."""
    x, dt = x.astype(F32), dt.astype(F32)
    decay = jnp.exp(dt[..., None] * a.astype(F32))
    if reset is not None:
        decay = jnp.where(reset[:, None, None], 0.0, decay)
    state = decay * state + (dt * x)[..., None] * b.astype(F32)[:, None, :]
    y = jnp.einsum("BCS,BS->BC", state, c.astype(F32))
    if d is not None:
        y = y + d.astype(F32) * x
    return y, state


def selective_scan_reference(
    x: Float[Array, "B T C"],
    dt: Float[Array, "B T C"],
    a: Float[Array, "C S"],
    b: Float[Array, "B T S"],
    c: Float[Array, "B T S"],
    d: Float[Array, " C"] | None = None,
    initial_state: Float[Array, "B C S"] | None = None,
    reset: Bool[Array, "B T"] | None = None,
) -> tuple[Float[Array, "B T C"], Float[Array, "B C S"]]:
    """The selective scan one token at a time (the spec): ``(y float32, final state)``."""
    B, T, C = x.shape
    state = _initial(initial_state, (B, C, a.shape[-1]))
    reset = jnp.zeros((B, T), bool) if reset is None else reset

    def step(h, inputs):
        xt, dtt, bt, ct, rt = inputs
        y, h = selective_step(h, xt, dtt, a, bt, ct, d, rt)
        return h, y

    swap = lambda t: jnp.swapaxes(t, 0, 1)  # noqa: E731
    state, y = jax.lax.scan(step, state, tuple(map(swap, (x, dt, b, c, reset))))
    return swap(y), state


def _combine(left, right):
    """Composes two affine maps ``h -> m h + u`` (``left`` first): the scan's operator."""
    (m1, u1), (m2, u2) = left, right
    return m1 * m2, m2 * u1 + u2


def selective_scan(
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
) -> tuple[Float[Array, "B T C"], Float[Array, "B C S"]]:
    """Mamba's selective scan by chunks: ``(y float32 [B, T, C], final state [B, C, S])``.

    Equal to :func:`selective_scan_reference`. A ``lax.scan`` over chunks carries the state; in
    each chunk a ``lax.associative_scan`` composes the per-token maps ``h -> exp(dt a) h + dt x b``
    (``log2 L`` parallel steps) and the chunk's outputs are read from its ``[B, L, C, S]``
    states. The chunk body is rematerialised, so the backward pass keeps only the ``[B, C, S]``
    states between chunks, not every token's. ``reset`` as in :func:`ssd` (the decay of a
    marked token is 0).
    """
    _check_chunk(chunk)
    B, T, C = x.shape
    S = a.shape[-1]
    h0 = _initial(initial_state, (B, C, S))
    reset = jnp.zeros((B, T), bool) if reset is None else reset
    xs, dts, bs, cs, rs = _pad_to_chunks(chunk, x.astype(F32), dt.astype(F32), b, c, reset)
    nc = xs.shape[1] // chunk
    af = a.astype(F32)

    @jax.checkpoint
    def body(h, inputs):
        xc, dtc, bc, cc, rc = inputs  # [B, L, C], [B, L, C], [B, L, S], [B, L, S], [B, L]
        m = jnp.where(rc[..., None, None], 0.0, jnp.exp(dtc[..., None] * af))  # [B, L, C, S]
        u = (dtc * xc)[..., None] * bc.astype(F32)[:, :, None, :]
        m, u = jax.lax.associative_scan(_combine, (m, u), axis=1)
        hs = m * h[:, None] + u  # every token's state, from the state entering the chunk
        y = jnp.einsum("BLCS,BLS->BLC", hs, cc.astype(F32))
        return hs[:, -1], y

    split = lambda t: jnp.moveaxis(t.reshape(B, nc, chunk, *t.shape[2:]), 1, 0)  # noqa: E731
    h_end, y = jax.lax.scan(body, h0, tuple(map(split, (xs, dts, bs, cs, rs))))
    y = jnp.moveaxis(y, 0, 1).reshape(B, nc * chunk, C)[:, :T]
    if d is not None:
        y = y + d.astype(F32) * x.astype(F32)
    return y, h_end


# -- the short causal convolution -----------------------------------------------------------
def causal_conv1d(
    x: Float[Array, "B T C"],
    w: Float[Array, "K C"],
    bias: Float[Array, " C"] | None = None,
    state: Float[Array, "B K1 C"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
) -> tuple[Float[Array, "B T C"], Float[Array, "B K1 C"]]:
    """Depthwise causal convolution: ``y_t = sum_k w[k] * x_{t - K + 1 + k} + bias``.

    ``state``: the ``K - 1`` inputs before ``x`` (zeros: the sequence starts here). Returns
    ``(y, new state)``, the new state being the last ``K - 1`` inputs, so a decoder can feed a
    prompt and then one token at a time. ``K`` shifted multiply-adds (K is 2-4): cheaper than a
    general convolution for a depthwise kernel this short, and the same on every backend.
    ``segment_ids`` (packed rows): a tap reading another document's token reads zero instead.
    """
    K = w.shape[0]
    B, T, C = x.shape
    if state is None:
        state = jnp.zeros((B, K - 1, C), x.dtype)
    full = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, K - 1 + T, C]
    if segment_ids is None:
        y = sum(full[:, k : k + T] * w[k].astype(x.dtype) for k in range(K))
    else:  # the K - 1 state slots belong to no document of this row
        seg = jnp.pad(segment_ids, [(0, 0), (K - 1, 0)], constant_values=-1)
        y = sum(
            jnp.where((seg[:, k : k + T] == segment_ids)[..., None], full[:, k : k + T], 0)
            * w[k].astype(x.dtype)
            for k in range(K)
        )
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y, full[:, T:]
