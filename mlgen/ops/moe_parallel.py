"""MoE routing and dispatch over a device mesh, inside ``jax.shard_map``: each device routes
and dispatches its own tokens, and with the experts split over mesh axes (expert
parallelism) the tokens reach their experts' devices by all-to-all.

Shapes as in :mod:`mlgen.ops.moe`, plus n expert shards (the product of the expert axes'
sizes), El = E / n experts per shard, and per shard T_l local tokens (the B * T tokens split
over the batch and length axes; every expert shard holds different tokens).

Why not leave it to XLA's partitioner: given batch-sharded tokens, it gathers the router logits
of all tokens for ``top_k`` and the choices of all tokens for the sort, then runs every
expert on every token on every device (seen in the compiled HLO of the plain layer on a
``data=4`` mesh: ``[E, G, D]`` buffers of the global capacity G on each device).

Each shard routes its own tokens (routing is per token; the auxiliary losses sum their
statistics over all shards, so they are the unsplit batch's numbers), then:

- n = 1 (experts not split: data parallel): :func:`mlgen.ops.moe.dropless` /
  :func:`mlgen.ops.moe.capacity` of the shard's tokens.
- ``capacity``: GShard's layout. Each shard fills an ``[E, G, D]`` buffer of its own tokens,
  G = ``capacity_of(T_l, k, E, capacity_factor)`` slots per expert (capacity is per shard, as
  in GShard, so what drops depends on the shard's tokens; with no drops the result is the
  one-device result); the buffer, seen as ``[n, El, G, D]``, goes through an all-to-all, each
  shard runs its El experts on the ``[El, n * G, D]`` it received, and a second all-to-all
  brings the outputs back. Buffers: ``E * G * D`` per shard each way
  (``capacity_factor * T_l * k * D``), as on one device.
- ``dropless``: nothing is dropped, so a shard must be able to take every choice of every
  shard. Each shard sorts its M = T_l * k choices by expert (hence by destination shard) and
  sends shard j a fixed-size block of C = T_l * min(k, El) rows (the most any shard can route
  to j's El experts: each token picks an expert once), zero rows past the real ones, and
  beside it each row's expert on j (int32 ``[n, C]``, a second, 1/D-sized all-to-all). The
  receiver regroups the ``n * C`` rows by local expert and runs the grouped SwiGLU
  (:func:`mlgen.ops.moe.grouped_swiglu`'s ``impl``); a third all-to-all returns the rows.
  Memory: send and receive buffers of ``n * C * D`` per shard each way, ``n * min(k, El) / k``
  times the shard's choices (4x for n=4, k=2, El>=2; the capacity path with factor f holds
  f x): the worst case, every token of every shard routed to one shard, has to fit in a
  static shape. The ``"blocked"`` grouped matmuls also compute over the whole received
  buffer (the same factor in FLOPs, most of them on zero rows); ``"ragged"`` computes the
  received rows' groups only. For many expert shards use ``capacity``.

The experts' weights enter as the shards they are (``[El, D, F]`` per shard: nothing of the
other shards' experts is gathered); axes of the weights sharded over a token axis (fsdp's
``embed``) are gathered at the ``shard_map`` boundary, once per layer as FSDP does anyway; the
router (``[D, E]``, small) is gathered whole. Mesh axes the tokens are not split over (e.g.
``tensor``) stay automatic inside. The output is split like the input.

Measured on the 2-core CPU (load 6-8 from other jobs) with 4 simulated devices, the layer's
forward + backward at T=2048 tokens (8 x 256), D=256, F=512, E=8, k=2, float32, median of 11
alternating rounds, two runs (``mlgen --cpu-devices 4 bench moe --expert-shards 1 4 --paths
blocked,capacity --rounds 11``): capacity (factor 1.25) 0.38 / 0.42 s on ``data=4`` (experts
whole on every device) and 0.31 / 0.36 s on ``expert=4``, where the four all-to-alls of its
``[4, 2, 160, 256]`` buffers alone take 7-11 ms (2-3 %); dropless (blocked, 128) 0.92 / 1.04 s
on ``data=4`` and 2.10 / 2.59 s on ``expert=4``, 2.3-2.5x slower: each device's blocked
matmuls run over its 4 x 1024 received rows, 4x its 1024 choices (the worst case the buffer is
sized for), and the all-to-alls of ``[4, 1024, 256]`` take 0.13 s (5-6 %). Simulated devices
share the two cores, so this shows the exchange's overhead, not a speed-up.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mlgen.ops import moe
from mlgen.typing import Array, Float

Dispatch = Literal["dropless", "capacity"]


def expert_parallel(
    x: Float[Array, "B T D"],
    router: Float[Array, "D E"],
    w_gate: Float[Array, "E D F"],
    w_up: Float[Array, "E D F"],
    w_down: Float[Array, "E F D"],
    *,
    k: int,
    expert_axes: tuple[str, ...],
    batch_axes: tuple[str, ...] = (),
    length_axes: tuple[str, ...] = (),
    mask: Float[Array, "B T"] | None = None,
    score: moe.Score = "softmax",
    renormalize: bool = True,
    mesh=None,
    dispatch: Dispatch = "dropless",
    capacity_factor: float = 1.25,
    impl: moe.GroupedImpl = "auto",
    block_size: int = 128,
) -> tuple[Float[Array, "B T D"], dict[str, jax.Array]]:
    """Routing (``x @ router``, :func:`mlgen.ops.moe.route`) and ``dropless`` / ``capacity``
    dispatch with the experts split over ``expert_axes``, each shard routing its own tokens.

    Args:
      x: tokens, split over ``batch_axes`` on B and ``length_axes`` on T.
      router: the router kernel (float32 logits; replicated inside, it is small).
      w_gate, w_up, w_down: the stacked experts, E sharded over ``expert_axes``; they
        compute in x's dtype.
      k, score, renormalize: as in :func:`mlgen.ops.moe.route`.
      expert_axes: mesh axes the experts are split over (n shards, their sizes' product);
        each must be one of ``batch_axes`` / ``length_axes`` (every expert shard holds
        different tokens). ``()``: every shard holds all experts and dispatches its own tokens
        (data parallel; no exchange).
      batch_axes, length_axes: mesh axes the tokens are split over (they become manual in the
        ``shard_map``; other mesh axes, e.g. ``tensor``, stay automatic).
      mask: 1 for the tokens the auxiliary losses average over.
      mesh: a ``Mesh`` / ``AbstractMesh``; default the active one (``jax.set_mesh``).
      dispatch: ``"dropless"`` or ``"capacity"`` (per-shard capacity; see the module doc).
      capacity_factor: capacity's slots per expert relative to balanced routing.
      impl, block_size: dropless's grouped matmuls (``mlgen.ops.moe.grouped_swiglu``).

    Returns:
      ``(y, stats)``: y in ``x.dtype``, split like x; stats over all shards' tokens (float32 /
      int32 scalars unless said): ``lb_loss`` and ``z_loss`` (the values of the unsplit batch:
      :func:`mlgen.ops.moe.load_balancing_loss` with ``axis_name``), ``tokens_per_expert``
      ``[E]`` and ``dropped``.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty:
        raise ValueError("expert_parallel needs a mesh (pass mesh= or use jax.set_mesh)")
    expert_axes, batch_axes, length_axes = map(tuple, (expert_axes, batch_axes, length_axes))
    token_axes = batch_axes + length_axes
    missing = [a for a in expert_axes + token_axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"expert_parallel: mesh axes {missing} not in {mesh.axis_names}")
    if not set(expert_axes) <= set(token_axes):
        raise ValueError(
            f"expert_parallel: the expert axes {expert_axes} must be among the axes the tokens "
            f"are split over {token_axes}"
        )
    if dispatch not in ("dropless", "capacity"):
        raise ValueError(f"expert_parallel: dispatch must be dropless | capacity, got {dispatch!r}")
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)  # noqa: E731
    B, T, _ = x.shape
    E = w_gate.shape[0]
    for what, dim, axes in (("E", E, expert_axes), ("B", B, batch_axes), ("T", T, length_axes)):
        if dim % size(axes):
            raise ValueError(
                f"expert_parallel: {what}={dim} is not divisible by the {size(axes)} shards of "
                f"mesh axes {axes}"
            )
    if dispatch == "dropless":
        impl = moe._grouped_impl(impl, x)
    mask = jnp.ones((B, T), jnp.float32) if mask is None else mask.astype(jnp.float32)
    fn = _sharded(
        mesh,
        expert_axes,
        batch_axes,
        length_axes,
        _Static(k, score, bool(renormalize), dispatch, float(capacity_factor), impl, block_size),
    )
    return fn(x, mask, router, w_gate, w_up, w_down)


@dataclasses.dataclass(frozen=True)
class _Static:
    k: int
    score: str
    renormalize: bool
    dispatch: str
    capacity_factor: float
    impl: str
    block_size: int


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


@functools.lru_cache(maxsize=64)
def _sharded(mesh, expert_axes, batch_axes, length_axes, cfg: _Static):
    """Routing and the exchange as one jitted ``shard_map`` (cached per static setting;
    jitted so that an eager call of a partial-manual ``shard_map`` works, as in ring attention)."""
    b, t = _spec_entry(batch_axes), _spec_entry(length_axes)
    tokens, wspec = P(b, t, None), P(_spec_entry(expert_axes), None, None)
    token_axes = batch_axes + length_axes
    n = math.prod(mesh.shape[a] for a in expert_axes)
    axis = expert_axes[0] if len(expert_axes) == 1 else expert_axes  # all_to_all's axis_name
    replicated = tuple(a for a in token_axes if a not in expert_axes)  # the weights' copies

    def body(x, mask, router, w_gate, w_up, w_down):
        Bl, Tl, D = x.shape
        # Made varying over the token axes before the cast, so that the weights' gradients are
        # summed over those axes in the weights' own dtype, not the compute dtype (bfloat16
        # all-reduces there also crashed XLA:CPU's AllReducePromotion pass).
        w_gate, w_up, w_down = (
            _varying(w, replicated).astype(x.dtype) for w in (w_gate, w_up, w_down)
        )
        logits = jnp.einsum("BTD,DE->BTE", x.astype(jnp.float32), router.astype(jnp.float32))
        weights, experts, probs = moe.route(
            logits, cfg.k, score=cfg.score, renormalize=cfg.renormalize
        )
        lb = moe.load_balancing_loss(probs, experts, mask, axis_name=token_axes)
        z = moe.router_z_loss(logits, mask, axis_name=token_axes)
        flat = lambda a: a.reshape(Bl * Tl, a.shape[-1])  # noqa: E731
        args = (flat(x), flat(weights), flat(experts), w_gate, w_up, w_down)
        if n == 1:  # every shard holds every expert: the one-device dispatch of its tokens
            if cfg.dispatch == "capacity":
                y, s = moe.capacity(*args, capacity_factor=cfg.capacity_factor)
            else:
                y, s = moe.dropless(*args, impl=cfg.impl, block_size=cfg.block_size)
            counts, dropped = s["tokens_per_expert"], s["dropped"]
        elif cfg.dispatch == "capacity":
            y, counts, dropped = _capacity_shard(*args, axis=axis, n=n, factor=cfg.capacity_factor)
        else:
            y, counts, dropped = _dropless_shard(
                *args, axis=axis, n=n, impl=cfg.impl, block=cfg.block_size
            )
        stats = {
            "lb_loss": lb,
            "z_loss": z,
            "tokens_per_expert": jax.lax.psum(counts, token_axes),
            "dropped": jax.lax.psum(dropped, token_axes),
        }
        return y.reshape(Bl, Tl, D), stats

    return jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(tokens, P(b, t), P(), wspec, wspec, wspec),
            out_specs=(tokens, {name: P() for name in _STATS}),
            axis_names=set(token_axes),
            check_vma=True,
        )
    )


_STATS = ("lb_loss", "z_loss", "tokens_per_expert", "dropped")


def _varying(x, axes: tuple[str, ...]):
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def _exchange(x, axis):
    """``[n, ...]``: block j goes to shard j; the result's block i came from shard i."""
    return jax.lax.all_to_all(x, axis, 0, 0)


def _capacity_shard(x, weights, experts, w_gate, w_up, w_down, *, axis, n, factor):
    """One shard of capacity dispatch: local ``[E, G, D]`` buffer -> experts -> back."""
    T, D = x.shape
    k = experts.shape[1]
    El = w_gate.shape[0]
    E = El * n
    G = moe.capacity_of(T, k, E, factor)
    slot, counts = moe.capacity_slots(experts, E, G)
    token = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, k))
    src = jnp.full((E * G + 1,), T, jnp.int32).at[slot.reshape(-1)].set(token.reshape(-1))
    buf = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[src[: E * G]]
    recv = _exchange(buf.reshape(n, El, G, D), axis)  # [source shard, local expert, slot]
    h = recv.transpose(1, 0, 2, 3).reshape(El, n * G, D)
    out = moe.expert_swiglu(h, w_gate, w_up, w_down).reshape(El, n, G, D).transpose(1, 0, 2, 3)
    back = _exchange(out, axis).reshape(E * G, D)  # global expert order again
    back = jnp.concatenate([back, jnp.zeros((1, D), back.dtype)])
    y = moe._combine(back[slot], weights, x.dtype)
    return y, counts, jnp.sum(slot == E * G).astype(jnp.int32)


def _dropless_shard(x, weights, experts, w_gate, w_up, w_down, *, axis, n, impl, block):
    """One shard of dropless dispatch: sort by expert, worst-case blocks per destination."""
    T, D = x.shape
    k = experts.shape[1]
    El = w_gate.shape[0]
    E, M = El * n, T * k
    C = T * min(k, El)  # the most choices of one shard that one shard's El experts can get
    order, counts = moe.sort_by_expert(experts, E)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(M, dtype=order.dtype))
    per_shard = counts.reshape(n, El).sum(axis=1)
    start = jnp.cumsum(per_shard) - per_shard  # first sorted choice bound for each shard
    # Row p of the block for shard j: sorted choice start[j] + p (its token and local expert),
    # or the zero row with expert El (none).
    p = jnp.arange(C, dtype=jnp.int32)
    real = p < per_shard[:, None]
    sorted_choice = order[jnp.minimum(start[:, None] + p, M - 1)]  # [n, C]
    token = jnp.where(real, sorted_choice // k, T)
    local = jnp.where(real, experts.reshape(-1)[sorted_choice] % El, El)
    send = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[token]  # [n, C, D]
    recv = _exchange(send, axis).reshape(n * C, D)
    local = _exchange(local, axis).reshape(n * C)  # each row's expert on this shard
    # Regroup the rows by local expert (the padding rows, El, last).
    order2 = jnp.argsort(local, stable=True).astype(jnp.int32)
    group_sizes = moe.expert_counts(local[:, None], El)  # bincount drops the padding's El
    inverse2 = jnp.zeros_like(order2).at[order2].set(jnp.arange(n * C, dtype=order2.dtype))
    if impl == "blocked":
        out, dest = moe._blocked_swiglu(recv, order2, group_sizes, w_gate, w_up, w_down, block)
        done = out[dest[inverse2]]
    else:
        done = moe.grouped_swiglu(recv[order2], group_sizes, w_gate, w_up, w_down, impl=impl)
        done = done[inverse2]
    ret = _exchange(done.reshape(n, C, D), axis).reshape(n * C, D)
    # Choice c went to shard j = expert // El as row inverse[c] - start[j] of its block.
    shard = experts.reshape(-1) // El
    ys = ret[shard * C + inverse - start[shard]]
    y = moe._combine(ys.reshape(T, k, D), weights, x.dtype)
    return y, counts, jnp.zeros_like(counts[0])
