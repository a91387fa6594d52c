"""Basic NNX layers whose parameters carry logical axis names where they are created."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mlgen.sharding.partition import constrain
from mlgen.sharding.rules import check_names

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def param(
    rngs: nnx.Rngs | None,
    init: Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """An ``nnx.Param`` of ``shape`` with logical ``names`` (one per dimension)."""
    shape = tuple(int(s) for s in shape)
    names = check_names(tuple(names))
    if len(names) != len(shape):
        raise ValueError(f"param: {len(names)} logical names {names} for shape {shape}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    # With no mesh active (a notebook building a model eagerly) Flax's eager sharding would fail
    # ("An auto mesh context or metadata is required"): keep the names as metadata only then.
    # Under a mesh (sharded_init, mlgen.train) nothing changes.
    no_mesh = {"eager_sharding": False} if jax.sharding.get_abstract_mesh().empty else {}
    return nnx.Param(init(key, shape, dtype), out_sharding=names, **no_mesh)


def zeros_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.ones(shape, dtype)


def normal_init(stddev: float) -> Initializer:
    def init(key, shape, dtype=jnp.float32):
        return stddev * jax.random.normal(key, shape, dtype)

    return init


def fan_in_init(fan_in: int, scale: float = 1.0) -> Initializer:
    """Truncated-normal-ish init with variance scale / fan_in."""
    return normal_init((scale / max(fan_in, 1)) ** 0.5)


def dropout(x, rate: float, rng):
    """Inverted dropout; identity when ``rate == 0`` or ``rng is None`` (evaluation)."""
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


ADAPTERS = ("lora_a", "lora_b")
LORA_OUT = "lora_out"  # the checkpoint name of an adapted projection's output


@dataclasses.dataclass(frozen=True)
class LoRA:
    """A low-rank adapter on a :class:`Linear` (Hu et al. 2021, "LoRA"):
    ``y = x W + (alpha / rank) * (x A) B``.

    ``A`` ``[in..., rank]`` starts random (variance 1 / fan-in), ``B`` ``[rank, out...]`` at zero,
    so an adapted model computes what its base does until ``B`` has trained. The adapters are the
    parameters named :data:`ADAPTERS` (``lora_a``, ``lora_b``); :func:`is_adapter` tells them
    from the frozen base by their path.
    """

    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def is_adapter(path: str) -> bool:
    """Whether the parameter at ``path`` (``"blocks/attn/q/lora_a"``) is a LoRA adapter."""
    return path.rsplit("/", 1)[-1] in ADAPTERS


def merge_adapters(params: dict, scale: float) -> dict:
    """``params`` (a pure dict) with every adapted linear's ``kernel + scale * A @ B`` folded in
    and its adapters dropped: the same function, computed by the plain layers.

    Works on stacked layers too: ``A`` ``[*lead, *in, r]``, ``B`` ``[*lead, r, *out]``, kernel
    ``[*lead, *in, *out]``. Summed in float32 and rounded once to the kernel's dtype.
    """
    out = {}
    for name, value in params.items():
        if isinstance(value, dict):
            out[name] = merge_adapters(value, scale)
        elif name not in ADAPTERS:
            out[name] = value
    if "lora_a" in params:
        a, b, w = params["lora_a"], params["lora_b"], params["kernel"]
        lead = a.ndim + b.ndim - 2 - w.ndim
        n_in, n_out = a.ndim - lead - 1, b.ndim - lead - 1
        letters = "abcdefghijklmnopqrstuvwxy"
        ls, ins = letters[:lead], letters[lead : lead + n_in]
        outs = letters[lead + n_in : lead + n_in + n_out]
        delta = jnp.einsum(
            f"{ls}{ins}z,{ls}z{outs}->{ls}{ins}{outs}",
            a.astype(jnp.float32),
            b.astype(jnp.float32),
        )
        out["kernel"] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return out


class Linear(nnx.Module):
    """``y = einsum(x, w) (+ b)`` with multi-dimensional in/out features.

    ``in_features`` / ``out_features`` are tuples so a projection can map ``D -> (N, H)``
    without reshapes; ``in_names`` / ``out_names`` are their logical axis names. ``lora``
    adds a low-rank adapter (:class:`LoRA`) beside the kernel.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        in_names: Sequence[str | None],
        out_names: Sequence[str | None],
        use_bias: bool = False,
        init: Initializer | None = None,
        lora: LoRA | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = (in_features,) if isinstance(in_features, int) else tuple(in_features)
        self.out_features = (
            (out_features,) if isinstance(out_features, int) else tuple(out_features)
        )
        fan_in = 1
        for f in self.in_features:
            fan_in *= f
        init = init or fan_in_init(fan_in)
        self.kernel = param(
            rngs,
            init,
            self.in_features + self.out_features,
            tuple(in_names) + tuple(out_names),
            param_dtype,
        )
        self.bias = (
            param(rngs, zeros_init, self.out_features, tuple(out_names), param_dtype)
            if use_bias
            else None
        )
        # The rank axis has no logical name: replicated, it is tiny.
        self.lora_a = (
            param(
                rngs,
                fan_in_init(fan_in),
                self.in_features + (lora.rank,),
                tuple(in_names) + (None,),
                param_dtype,
            )
            if lora is not None
            else None
        )
        self.lora_b = (
            param(
                rngs,
                zeros_init,
                (lora.rank,) + self.out_features,
                (None,) + tuple(out_names),
                param_dtype,
            )
            if lora is not None
            else None
        )
        self.lora_scale = lora.scale if lora is not None else 0.0
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, out_dtype=None) -> jax.Array:
        """``out_dtype``: accumulate and return in that dtype (float32 outputs from bfloat16
        compute: an LM's logits); default: the compute dtype."""
        n_in, n_out = len(self.in_features), len(self.out_features)
        letters = "abcdefghijklmnopqrstuvwxyz"
        batch = letters[: x.ndim - n_in]
        ins = letters[x.ndim - n_in : x.ndim]
        outs = letters[x.ndim : x.ndim + n_out]
        y = jnp.einsum(
            f"{batch}{ins},{ins}{outs}->{batch}{outs}",
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            preferred_element_type=out_dtype,
        )
        if self.lora_a is not None:
            r = letters[x.ndim + n_out]

            low = jnp.einsum(
                f"{batch}{ins},{ins}{r}->{batch}{r}",
                x.astype(self.dtype),
                self.lora_a[...].astype(self.dtype),
            )
            delta = jnp.einsum(
                f"{batch}{r},{r}{outs}->{batch}{outs}",
                low,
                self.lora_b[...].astype(self.dtype),
                preferred_element_type=out_dtype,
            )
            # Named for the remat policies that keep matmul outputs (dots, dots_no_batch): they
            # keep this sum instead of both matmuls' outputs, which the backward then does not
            # need. configs/lm/small.py, dots_no_batch, rank 16 on all projections: temp 0.539 GiB
            # dense, 0.824 with LoRA unnamed, 0.515 named; Llama-3-8B on v5p-128: 48.9 dense,
            # 87.1 unnamed (99% of HBM), 48.2 named.
            y = checkpoint_name(y + (self.lora_scale * delta).astype(y.dtype), LORA_OUT)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table ``[V, D]``; ``attend`` gives tied output logits."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        names=("vocab", "embed"),
        init: Initializer | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.embedding = param(
            rngs, init or normal_init(0.02), (num_embeddings, features), names, param_dtype
        )
        self.vocab_name = names[0]
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather rows from a table that is whole along D. Gathering from the D-sharded (fsdp)
        # table gives D-sharded rows, which the partitioner can only turn into batch-sharded
        # activations by replicating them ("Involuntary full rematerialization", forward and
        # backward). Gathering the table over fsdp first is what FSDP does for every weight.
        table = constrain(self.embedding[...], (self.vocab_name, None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array, *, out_dtype=None) -> jax.Array:
        """Tied output logits ``x @ table.T`` (``out_dtype`` as in ``Linear``)."""
        return jnp.einsum(
            "...d,vd->...v",
            x.astype(self.dtype),
            self.embedding[...].astype(self.dtype),
            preferred_element_type=out_dtype,
        )


class RMSNorm(nnx.Module):
    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-6,
        names=("norm",),
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.scale = param(rngs, ones_init, (features,), names, param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-5,
        use_bias: bool = True,
        use_scale: bool = True,
        names=("norm",),
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.scale = param(rngs, ones_init, (features,), names, param_dtype) if use_scale else None
        self.bias = param(rngs, zeros_init, (features,), names, param_dtype) if use_bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)
