"""Mixture-of-experts feed-forward layer: a router and SwiGLU experts with stacked weights.

Supports:
- softmax (Mixtral, Switch) or sigmoid (DeepSeek-V3) router scores, top-k, optional
  renormalisation of the k weights; router logits in float32;
- the Switch / Mixtral load-balancing loss and the ST-MoE router z-loss, returned (unweighted,
  and weighted into one ``loss``) with the dispatch statistics;
- ``dropless`` dispatch (grouped matmuls over the choices sorted by expert; nothing dropped) and
  ``capacity`` dispatch (fixed ``[E, G, D]`` buffers, overflow dropped and counted):
  ``mlgen.ops.moe``;
- DeepSeek-style shared experts: an always-on dense SwiGLU of width
  ``num_shared_experts * mlp_dim`` added to the routed output;
- logical axis names on every parameter: the stacked experts' leading axis is ``expert``;
- under a mesh whose rules split the tokens (``batch`` / ``length``), each device routes and
  dispatches its own tokens inside ``shard_map``; when the rules also split ``expert``
  (``mesh.expert`` under ``rules="auto"``: expert parallelism) each device holds E / n experts
  and the tokens travel to them and back by all-to-all (``mlgen.ops.moe_parallel``, where the
  buffers are described). Capacity is then per device (GShard's groups). The losses and
  statistics are those of all tokens on any mesh; with nothing dropped the outputs and
  gradients are the one-device ones (float32: 1e-5).

With the defaults (softmax, top-2, renormalised) it computes what Hugging Face's
``MixtralSparseMoeBlock`` does: router ``gate.weight`` is ``router.kernel.T``, expert i's
``w1`` / ``w3`` / ``w2`` (gate / up / down) are ``gate[i].T`` / ``up[i].T`` / ``down[i].T``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType

from mlgen.config import check
from mlgen.nn.core import Linear, fan_in_init, param
from mlgen.nn.mlp import MLP
from mlgen.ops import moe as ops
from mlgen.ops import moe_parallel
from mlgen.sharding.rules import mesh_axes_of
from mlgen.typing import Array, Float

DISPATCHES = ("dropless", "capacity")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """How an MoE layer routes and dispatches (one section a model family can carry).

    Attributes:
      num_experts: routed experts E.
      experts_per_token: k, the experts each token is sent to (1 <= k <= E).
      score: ``"softmax"`` over all experts or ``"sigmoid"`` per expert.
      renormalize: divide the k selected scores by their sum (Mixtral: True).
      dispatch: ``"dropless"`` (every choice computed) or ``"capacity"`` (at most
        ``ceil(capacity_factor * tokens * k / E)`` choices per expert, the rest dropped;
        ``tokens`` are the layer's B * T, or one device's share under a mesh that splits them).
      capacity_factor: slots per expert relative to perfectly balanced routing (capacity only).
      num_shared_experts: always-on experts, one dense SwiGLU of ``num_shared_experts * mlp_dim``.
      grouped_impl: dropless's grouped matmuls, ``"auto"`` | ``"ragged"`` | ``"blocked"``
        (``mlgen.ops.moe.grouped_swiglu``).
      block_size: rows per block of the ``"blocked"`` grouped matmuls.
      load_balance_weight: weight of the load-balancing loss in the layer's ``loss``.
      router_z_weight: weight of the router z-loss in the layer's ``loss``.
    """

    num_experts: int = 8
    experts_per_token: int = 2
    score: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25
    num_shared_experts: int = 0
    grouped_impl: Literal["auto", "ragged", "blocked"] = "auto"
    block_size: int = 128
    load_balance_weight: float = 0.01
    router_z_weight: float = 0.001

    def validate(self) -> None:
        check(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
        check(
            1 <= self.experts_per_token <= self.num_experts,
            "experts_per_token",
            f"must be in [1, num_experts={self.num_experts}], got {self.experts_per_token}",
        )
        check(self.score in ops.SCORES, "score", f"must be one of {ops.SCORES}, got {self.score!r}")
        check(
            self.dispatch in DISPATCHES,
            "dispatch",
            f"must be one of {DISPATCHES}, got {self.dispatch!r}",
        )
        check(
            self.capacity_factor > 0,
            "capacity_factor",
            f"must be > 0, got {self.capacity_factor}",
        )
        check(
            self.num_shared_experts >= 0,
            "num_shared_experts",
            f"must be >= 0, got {self.num_shared_experts}",
        )
        check(
            self.grouped_impl in ops.GROUPED_IMPLS,
            "grouped_impl",
            f"must be one of {ops.GROUPED_IMPLS}, got {self.grouped_impl!r}",
        )
        check(self.block_size > 0, "block_size", f"must be > 0, got {self.block_size}")
        for name in ("load_balance_weight", "router_z_weight"):
            v = getattr(self, name)
            check(v >= 0, name, f"must be >= 0, got {v}")


class MoE(nnx.Module):
    """Routed SwiGLU experts (plus optional shared experts): ``x [B, T, D] -> (y, aux)``.

    Parameters: ``router`` (a ``Linear`` ``[D, E]``, logical axes ``("embed", "expert")``),
    ``gate`` and ``up`` ``[E, D, F]`` (``("expert", "embed", "mlp")``), ``down`` ``[E, F, D]``
    (``("expert", "mlp", "embed")``), and ``shared`` (an ``MLP`` of width
    ``num_shared_experts * mlp_dim``) or None.
    """

    def __init__(
        self,
        d_model: int,
        mlp_dim: int,
        config: MoEConfig = MoEConfig(),
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        """``mlp_dim`` is each expert's width F; ``dtype`` the experts' compute dtype (the
        router computes in float32)."""
        config.validate()
        check(d_model > 0, "d_model", f"must be > 0, got {d_model}")
        check(mlp_dim > 0, "mlp_dim", f"must be > 0, got {mlp_dim}")
        self.config, self.dtype = config, dtype
        E, D, F = config.num_experts, d_model, mlp_dim
        self.router = Linear(
            D,
            E,
            in_names=("embed",),
            out_names=("expert",),
            dtype=jnp.float32,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.gate = param(rngs, fan_in_init(D), (E, D, F), ("expert", "embed", "mlp"), param_dtype)
        self.up = param(rngs, fan_in_init(D), (E, D, F), ("expert", "embed", "mlp"), param_dtype)
        self.down = param(rngs, fan_in_init(F), (E, F, D), ("expert", "mlp", "embed"), param_dtype)
        self.shared = (
            MLP(
                D,
                config.num_shared_experts * F,
                kind="swiglu",
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if config.num_shared_experts
            else None
        )

    def __call__(
        self, x: Float[Array, "B T D"], *, mask: Float[Array, "B T"] | None = None
    ) -> tuple[Float[Array, "B T D"], dict[str, jax.Array]]:
        """Routes the B * T tokens of ``x`` as one group (per device under a mesh that splits
        them: see the module doc).

        Args:
          x: tokens.
          mask: 1 for tokens the auxiliary losses average over (0: padding);
            every token is dispatched either way.

        Returns:
          ``(y, aux)``: y in the compute dtype; aux float32 scalars: ``loss``
          (``load_balance_weight * lb_loss + router_z_weight * z_loss``, to add to the
          objective), ``lb_loss``, ``z_loss``, ``dropped_fraction`` (dropped / all
          token-expert choices; 0 when dropless), ``expert_load_max`` and
          ``expert_load_min`` (the most / least loaded expert's choices over the mean; 1 is
          perfect balance).
        """
        cfg = self.config
        B, T, D = x.shape
        E, k = cfg.num_experts, cfg.experts_per_token
        x = x.astype(self.dtype)
        w = tuple(p[...] for p in (self.gate, self.up, self.down))
        split = shard_axes(B, T)
        if split is not None:
            # Each device routes and dispatches its own tokens, sending them to their experts'
            # devices when the experts are split (mlgen.ops.moe_parallel); the losses are
            # those of all tokens.
            expert_axes, batch_axes, length_axes = split
            check_expert_mesh(E, math.prod(_mesh_size(a) for a in expert_axes))
            y, stats = moe_parallel.expert_parallel(
                x,
                self.router.kernel[...],
                *w,
                k=k,
                expert_axes=expert_axes,
                batch_axes=batch_axes,
                length_axes=length_axes,
                mask=mask,
                score=cfg.score,
                renormalize=cfg.renormalize,
                dispatch=cfg.dispatch,
                capacity_factor=cfg.capacity_factor,
                impl=cfg.grouped_impl,
                block_size=cfg.block_size,
            )
            lb, z = stats["lb_loss"], stats["z_loss"]
        else:
            w = tuple(p.astype(self.dtype) for p in w)
            logits = self.router(x)
            weights, experts, probs = ops.route(
                logits, k, score=cfg.score, renormalize=cfg.renormalize
            )
            xt, wt, et = (a.reshape(B * T, a.shape[-1]) for a in (x, weights, experts))
            if cfg.dispatch == "dropless":
                y, stats = ops.dropless(
                    xt, wt, et, *w, impl=cfg.grouped_impl, block_size=cfg.block_size
                )
            else:
                y, stats = ops.capacity(xt, wt, et, *w, capacity_factor=cfg.capacity_factor)
            y = y.reshape(B, T, D)
            lb = ops.load_balancing_loss(probs, experts, mask)
            z = ops.router_z_loss(logits, mask)
        if self.shared is not None:
            y = y + self.shared(x)
        load = stats["tokens_per_expert"].astype(jnp.float32)
        mean_load = B * T * k / E
        aux = {
            "loss": cfg.load_balance_weight * lb + cfg.router_z_weight * z,
            "lb_loss": lb,
            "z_loss": z,
            "dropped_fraction": stats["dropped"].astype(jnp.float32) / (B * T * k),
            "expert_load_max": jnp.max(load) / mean_load,
            "expert_load_min": jnp.min(load) / mean_load,
        }
        return y, aux


def check_expert_mesh(num_experts: int, shards: int) -> None:
    """A ConfigError naming ``num_experts`` unless the experts split evenly into ``shards``
    (the size of the mesh axes the ``expert`` logical axis is sharded over)."""
    check(
        num_experts % shards == 0,
        "num_experts",
        f"{num_experts} is not divisible by the {shards} shards of the expert axis (mesh.expert)",
    )


def _mesh_size(axis: str) -> int:
    return int(jax.sharding.get_abstract_mesh().shape[axis])


def shard_axes(B: int, T: int):
    """``(expert_axes, batch_axes, length_axes)`` of the active mesh and rules when the tokens
    are split over mesh axes (and the experts, if split, over some of those); else None.

    The token axes are the ones the rules shard ``batch`` / ``length`` over, each only as far as
    the sizes divide B / T (a decode batch of 1 is split over nothing). With the tokens not
    split, or the experts split over an axis the tokens are not (custom rules; a small decode
    batch), the layer takes the plain path and XLA's partitioner places it.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    rules = tuple(flax.core.spmd.get_logical_axis_rules())
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ())))

    def axes_of(name: str, dim: int = 1, taken: tuple[str, ...] = ()) -> tuple[str, ...]:
        out: list[str] = []  # the longest prefix of the rule's axes (> 1) that divides dim
        for a in mesh_axes_of(rules, name):
            if a not in mesh.axis_names or a in taken or mesh.shape[a] == 1:
                continue
            split = math.prod(mesh.shape[b] for b in out) * mesh.shape[a]
            if types.get(a) == AxisType.Manual or dim % split:
                break
            out.append(a)
        return tuple(out)

    experts = tuple(
        a for a in mesh_axes_of(rules, "expert") if a in mesh.axis_names and mesh.shape[a] > 1
    )
    batch = axes_of("batch", B)
    length = axes_of("length", T, batch)
    if not batch + length or not set(experts) <= set(batch + length):
        return None
    return experts, batch, length
