"""Mixture of experts as pure array functions: routing, auxiliary losses, two dispatch paths.

Shapes (``mlgen.typing``'s alphabet plus the MoE letters): T tokens (flattened batch x
length), D model width, F expert width, E experts, k experts per token, M = T * k
token-expert choices, G slots per expert (the capacity).

- :func:`route`: router logits -> top-k weights and expert ids (softmax or sigmoid scores,
  optional renormalisation of the k weights), plus the per-token distribution over experts
  that the load-balancing loss uses.
- :func:`load_balancing_loss` (Switch / Mixtral) and :func:`router_z_loss` (ST-MoE).
- :func:`dropless`: every choice computed. Choices are sorted by expert and multiplied with
  grouped matmuls (:func:`grouped_swiglu`), then unsorted and combined with their weights.
- :func:`capacity`: each expert takes at most G = ceil(capacity_factor * M / E) choices into an
  ``[E, G, D]`` buffer (the layout an all-to-all exchanges between expert shards); choices
  past an expert's capacity are dropped and counted.

The experts are SwiGLU MLPs with stacked weights: ``w_gate``, ``w_up`` ``[E, D, F]`` and
``w_down`` ``[E, F, D]``; expert e of token x is ``(silu(x @ w_gate[e]) * (x @ w_up[e])) @
w_down[e]``. The pieces the dispatch paths are made of (:func:`sort_by_expert`,
:func:`grouped_swiglu`, :func:`capacity_slots`, :func:`expert_swiglu`) are public so an
expert-parallel layer can put its token exchange between them inside ``shard_map``.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from mlgen.ops.platform import platform
from mlgen.typing import Array, Float, Int

Score = Literal["softmax", "sigmoid"]
GroupedImpl = Literal["auto", "ragged", "blocked"]
SCORES = ("softmax", "sigmoid")
GROUPED_IMPLS = ("auto", "ragged", "blocked")


# ----------------------------------------------------------------------------- routing
def route(
    logits: Float[Array, "T E"], k: int, *, score: Score = "softmax", renormalize: bool
) -> tuple[Float[Array, "T k"], Int[Array, "T k"], Float[Array, "T E"]]:
    """Top-``k`` routing of each token (float32 math).

    Args:
      logits: router logits.
      k: experts per token (1 <= k <= E).
      score: ``"softmax"`` over all experts (Mixtral, Switch) or an independent
        ``"sigmoid"`` per expert (DeepSeek-V3).
      renormalize: divide the k selected scores by their sum (Mixtral does; Switch with k=1
        does not).

    Returns:
      ``(weights, experts, probs)``: the k combine weights (float32) and expert ids (int32) in
      descending score order, and each token's distribution over all experts (the softmax;
      for sigmoid the scores divided by their sum, as DeepSeek-V3's balance loss uses), which
      :func:`load_balancing_loss` takes.
    """
    E = logits.shape[-1]
    if not 1 <= k <= E:
        raise ValueError(f"route: k={k} must be in [1, {E}] (the number of experts)")
    if score not in SCORES:
        raise ValueError(f"route: score must be one of {SCORES}, got {score!r}")
    logits = logits.astype(jnp.float32)
    if score == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs = scores
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    weights, experts = jax.lax.top_k(scores, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def expert_counts(experts: Int[Array, "T k"], num_experts: int) -> Int[Array, " E"]:
    """How many token-expert choices go to each expert (all k choices counted)."""
    return jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.int32)


def load_balancing_loss(
    probs: Float[Array, "*T E"],
    experts: Int[Array, "*T k"],
    mask: Float[Array, " *T"] | None = None,
    *,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Switch Transformer's auxiliary loss ``E * sum_e f_e * P_e`` (float32 scalar).

    ``f_e`` is the fraction of tokens dispatched to expert e counting all k choices (so
    ``sum_e f_e = k``) and ``P_e`` the mean router probability of e, both over the tokens
    where ``mask`` is 1. This is the normalisation of Hugging Face transformers'
    ``load_balancing_loss_func`` (``modeling_mixtral.py``, checked against 5.24; also its
    ``attention_mask`` weighting): perfectly balanced routing gives ``k``, not 1. ``f_e``
    carries no gradient (it counts); the loss trains the router through ``P_e``.

    HF computes it once over all layers' tokens pooled (the ``f`` and ``P`` of the
    concatenation); the mean of this per-layer loss over layers equals that only for one layer.

    The tokens may have several leading dimensions (``[B, T, E]``). ``axis_name``: inside
    ``shard_map``, the mesh axes the tokens are split over; ``f`` and ``P`` are then those of
    all shards' tokens (their sums ``psum`` -ed), so the loss is the unsplit batch's (the
    product of per-shard ``f`` and ``P`` averaged over shards would not be).
    """
    E = probs.shape[-1]
    lead = tuple(range(probs.ndim - 1))
    m = jnp.ones(probs.shape[:-1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    chosen = jnp.sum(jax.nn.one_hot(experts, E, dtype=jnp.float32), axis=-2)  # [*T, E]
    sums = (
        jnp.sum(m),
        jnp.sum(chosen * m[..., None], axis=lead),
        jnp.sum(probs.astype(jnp.float32) * m[..., None], axis=lead),
    )
    count, chosen, p = _total(sums, axis_name)
    n = jnp.maximum(count, 1.0)
    return E * jnp.sum(jax.lax.stop_gradient(chosen / n) * (p / n))


def router_z_loss(
    logits: Float[Array, "*T E"],
    mask: Float[Array, " *T"] | None = None,
    *,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """ST-MoE's router z-loss: the mean over tokens (where ``mask`` is 1) of
    ``logsumexp(logits)^2`` (float32 scalar); keeps router logits small. ``axis_name``: as in
    :func:`load_balancing_loss` (the mean over all shards' tokens)."""
    z = jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))
    m = jnp.ones(z.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    total, count = _total((jnp.sum(z * m), jnp.sum(m)), axis_name)
    return total / jnp.maximum(count, 1.0)


def _total(sums, axis_name):
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)


# ----------------------------------------------------------------------------- experts
def expert_swiglu(
    xs: Float[Array, "E G D"],
    w_gate: Float[Array, "E D F"],
    w_up: Float[Array, "E D F"],
    w_down: Float[Array, "E F D"],
) -> Float[Array, "E G D"]:
    """Each expert's SwiGLU on its own ``[G, D]`` slice (a batched matmul over E)."""
    h = jax.nn.silu(jnp.einsum("EGD,EDF->EGF", xs, w_gate)) * jnp.einsum("EGD,EDF->EGF", xs, w_up)
    return jnp.einsum("EGF,EFD->EGD", h, w_down)


def sort_by_expert(
    experts: Int[Array, "T k"], num_experts: int
) -> tuple[Int[Array, " M"], Int[Array, " E"]]:
    """``(order, group_sizes)``: the flattened choices (index ``t * k + j``) sorted by expert,
    stably (token order within an expert), and how many each expert got."""
    flat = experts.reshape(-1)
    return jnp.argsort(flat, stable=True).astype(jnp.int32), expert_counts(experts, num_experts)


def grouped_swiglu(
    xs: Float[Array, "M D"],
    group_sizes: Int[Array, " E"],
    w_gate: Float[Array, "E D F"],
    w_up: Float[Array, "E D F"],
    w_down: Float[Array, "E F D"],
    *,
    impl: GroupedImpl = "auto",
    block_size: int = 128,
) -> Float[Array, "M D"]:
    """Expert e's SwiGLU on rows ``[start_e, start_e + group_sizes[e])`` of ``xs`` (rows grouped
    by expert, in expert order); rows past ``sum(group_sizes)`` give zeros.

    Args:
      impl: ``"ragged"``: three ``jax.lax.ragged_dot`` grouped matmuls. jax emits XLA's
        ``chlo.ragged_dot`` for TPU and GPU; the TPU compiler turns it into grouped-matmul
        kernels (no padding, no wasted FLOPs; compiled here for a v5e slice, not run; GPU not
        checked). On CPU jax lowers ragged_dot by masking the input once per group: E times
        the FLOPs and memory of the matmul. ``"blocked"``: sort + dense: each group is padded
        to a multiple of ``block_size`` rows, every block takes its expert's weights (a
        one-hot matmul) and runs a dense batched matmul; at most ``E * (block_size - 1)``
        padding rows.
        ``"auto"`` (default): ragged on TPU / GPU, blocked elsewhere (the platform compiled
        for: ``mlgen.ops.platform``).

        Measured on the 2-core CPU (AVX2, shared with other jobs: load 3-7), T=2048 tokens,
        D=256, F=512, E=8, k=2, float32, jit forward + backward of routing and dispatch,
        median of 11 alternating rounds (``python -m mlgen bench moe --block-size 128 256``):
        ragged 3.26 s, blocked 1.01 s (block 128) / 0.97 s (256), capacity (factor 1.25,
        same padded rows: 5120) 0.65 s. Ragged is 3x slower than blocked here (its CPU
        lowering does E times the FLOPs), so ``auto`` takes blocked on CPU; blocked trails
        capacity by ~1.5x, the cost of 40 small per-block matmuls (and their per-block weight
        gradients) against 8 large ones. Where XLA has the instruction, ``auto`` takes ragged.
      block_size: rows per block of ``"blocked"``.
    """
    if _grouped_impl(impl, xs) == "ragged":
        rd = jax.lax.ragged_dot
        h = jax.nn.silu(rd(xs, w_gate, group_sizes)) * rd(xs, w_up, group_sizes)
        return rd(h, w_down, group_sizes)
    rows = jnp.arange(xs.shape[0], dtype=jnp.int32)
    out, dest = _blocked_swiglu(xs, rows, group_sizes, w_gate, w_up, w_down, block_size)
    return out[dest]


def _grouped_impl(impl: str, x: jax.Array) -> str:
    if impl not in GROUPED_IMPLS:
        raise ValueError(f"grouped matmuls: impl must be one of {GROUPED_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "ragged" if platform(x) in ("tpu", "gpu") else "blocked"
    return impl


def _ends_at_or_below(ends: jax.Array, n: int) -> jax.Array:
    """``searchsorted(ends, arange(n), side="right")`` for non-decreasing, non-negative
    ``ends``: how many ends are <= i, as a histogram of the ends and its cumulative sum.

    jnp.searchsorted fails to trace inside a ``shard_map`` that leaves some mesh axes
    automatic (an expert-parallel layer's) under ``check_vma`` on jax 0.10.2 (an
    AssertionError in ``get_mat``); this needs only a scatter-add and a cumsum.
    """
    marks = jnp.zeros((n + 1,), jnp.int32).at[jnp.minimum(ends, n)].add(1)
    return jnp.cumsum(marks)[:n]


def _blocked_swiglu(source, rows_of, group_sizes, w_gate, w_up, w_down, block_size):
    """Sort + dense: the grouped SwiGLU of rows ``source[rows_of[i]]`` (i < M, grouped by
    expert). Returns ``(out, dest)``: row i's output is ``out[dest[i]]`` (a zero row for rows
    past the groups), so a caller composes its own permutation into that one gather."""
    N, D = source.shape
    M = rows_of.shape[0]
    E = w_gate.shape[0]
    b = max(1, min(block_size, M))
    nb = -(-M // b) + E  # sum_e ceil(g_e / b) <= ceil(M / b) + E blocks, whatever the groups
    group_sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(group_sizes)
    padded = (group_sizes + b - 1) // b * b
    padded_ends = jnp.cumsum(padded)
    rows = jnp.arange(M, dtype=jnp.int32)
    group = _ends_at_or_below(ends, M)  # E for rows past every group
    g = jnp.minimum(group, E - 1)
    dest = padded_ends[g] - padded[g] + rows - (ends[g] - group_sizes[g])
    dest = jnp.where(group < E, dest, nb * b)  # -> the zero row
    # Gathers both ways, no scatter of activations: padded row p holds source row src[p]
    # (N: none, the zero row).
    src = jnp.full((nb * b + 1,), N, jnp.int32).at[dest].set(rows_of.astype(jnp.int32))
    xpad = jnp.concatenate([source, jnp.zeros((1, D), source.dtype)])[src[: nb * b]]
    block_expert = _ends_at_or_below(padded_ends // b, nb)  # padded_ends are multiples of b
    block_expert = jnp.minimum(block_expert, E - 1)  # trailing empty blocks: any expert
    # Each block's weights by a one-hot matmul, not a gather: the gradient is then a matmul
    # too, where a gather's is a scatter-add of nb weight matrices (slow on XLA:CPU).
    pick = jax.nn.one_hot(block_expert, E, dtype=w_gate.dtype)
    per_block = [jnp.einsum("nE,E...->n...", pick, w) for w in (w_gate, w_up, w_down)]
    out = expert_swiglu(xpad.reshape(nb, b, D), *per_block).reshape(nb * b, D)
    return jnp.concatenate([out, jnp.zeros((1, D), out.dtype)]), dest


# ----------------------------------------------------------------------------- dispatch
def dropless(
    x: Float[Array, "T D"],
    weights: Float[Array, "T k"],
    experts: Int[Array, "T k"],
    w_gate: Float[Array, "E D F"],
    w_up: Float[Array, "E D F"],
    w_down: Float[Array, "E F D"],
    *,
    impl: GroupedImpl = "auto",
    block_size: int = 128,
) -> tuple[Float[Array, "T D"], dict[str, jax.Array]]:
    """``y_t = sum_j weights[t, j] * expert_{experts[t, j]}(x_t)``, no choice dropped.

    The M = T * k choices are sorted by expert (:func:`sort_by_expert`), run through
    :func:`grouped_swiglu` (``impl``, ``block_size``: see there), unsorted and combined.

    Returns:
      ``(y, stats)``: y in ``x.dtype`` (combined in float32); stats ``tokens_per_expert``
      ``[E]`` (choices per expert) and ``dropped`` (0 here; int32 scalars).
    """
    T, D = x.shape
    k = experts.shape[1]
    order, group_sizes = sort_by_expert(experts, w_gate.shape[0])
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(T * k, dtype=order.dtype))
    if _grouped_impl(impl, x) == "blocked":
        # Straight from the tokens into the padded blocks and back: one gather each way
        # (grouped_swiglu of the sorted rows would add two, and their scatter-add gradients).
        out, dest = _blocked_swiglu(x, order // k, group_sizes, w_gate, w_up, w_down, block_size)
        ys = out[dest[inverse]]
    else:
        ys = grouped_swiglu(x[order // k], group_sizes, w_gate, w_up, w_down, impl="ragged")
        ys = ys[inverse]
    y = _combine(ys.reshape(T, k, D), weights, x.dtype)
    return y, {"tokens_per_expert": group_sizes, "dropped": jnp.zeros((), jnp.int32)}


def capacity_of(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * num_tokens * k / num_experts)`` (at least 1)."""
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def capacity_slots(
    experts: Int[Array, "T k"], num_experts: int, capacity: int
) -> tuple[Int[Array, "T k"], Int[Array, " E"]]:
    """Where each choice goes in the flattened ``[E * G]`` buffer, and the choices per expert.

    Slots are given in priority order: every token's first choice (in token order), then every
    second choice, and so on (GShard, MaxText), so an overfull expert drops lower-ranked
    choices first. A choice past its expert's ``capacity`` gets the slot ``E * G`` (none): it is
    dropped.
    """
    T, k = experts.shape
    flat = experts.T.reshape(-1)  # [k * T]: choice rank major
    onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
    slot = jnp.where(position < capacity, flat * capacity + position, num_experts * capacity)
    return slot.reshape(k, T).T, jnp.sum(onehot, axis=0)


def capacity(
    x: Float[Array, "T D"],
    weights: Float[Array, "T k"],
    experts: Int[Array, "T k"],
    w_gate: Float[Array, "E D F"],
    w_up: Float[Array, "E D F"],
    w_down: Float[Array, "E F D"],
    *,
    capacity_factor: float,
) -> tuple[Float[Array, "T D"], dict[str, jax.Array]]:
    """Dispatch into fixed ``[E, G, D]`` buffers, G = :func:`capacity_of`; overflow is dropped.

    A dropped choice contributes nothing to its token's output (the token keeps its other
    choices and, in a residual block, its input). Everything is gathers and one batched matmul
    (:func:`expert_swiglu`) of static shapes, the layout an all-to-all over an ``expert`` mesh
    axis exchanges.

    Returns:
      ``(y, stats)``: y in ``x.dtype``; stats ``tokens_per_expert`` ``[E]`` (choices routed to
      each expert, dropped ones included) and ``dropped`` (the number of dropped choices).
    """
    T, D = x.shape
    k = experts.shape[1]
    E = w_gate.shape[0]
    G = capacity_of(T, k, E, capacity_factor)
    slot, counts = capacity_slots(experts, E, G)
    token = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, k))
    # src[s]: the token in slot s (T = empty -> the zero row).
    src = jnp.full((E * G + 1,), T, jnp.int32).at[slot.reshape(-1)].set(token.reshape(-1))
    buf = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[src[: E * G]].reshape(E, G, D)
    out = expert_swiglu(buf, w_gate, w_up, w_down).reshape(E * G, D)
    out = jnp.concatenate([out, jnp.zeros((1, D), out.dtype)])
    y = _combine(out[slot], weights, x.dtype)
    dropped = jnp.sum(slot == E * G).astype(jnp.int32)
    return y, {"tokens_per_expert": counts, "dropped": dropped}


def _combine(ys: jax.Array, weights: jax.Array, dtype) -> jax.Array:
    """``sum_j weights[:, j] * ys[:, j]`` in float32, cast to ``dtype``."""
    y = jnp.einsum("tkd,tk->td", ys.astype(jnp.float32), weights.astype(jnp.float32))
    return y.astype(dtype)
