"""Feed-forward blocks: SwiGLU (Llama) and GELU MLP (GPT-2)."""

from collections.abc import Collection
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.nn.core import Linear, LoRA
from mlgen.sharding import constrain


class MLP(nnx.Module):
    """``kind="swiglu"``: ``down(silu(gate(x)) * up(x))``; ``kind="gelu"``:
    ``down(gelu(up(x)))``. ``lora`` adapts the projections named in ``lora_targets``
    (``gate``, ``up``, ``down``)."""

    def __init__(
        self,
        d_model: int,
        mlp_dim: int,
        *,
        kind: Literal["swiglu", "gelu"] = "swiglu",
        use_bias: bool = False,
        lora: LoRA | None = None,
        lora_targets: Collection[str] = (),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if kind not in ("swiglu", "gelu"):
            raise ValueError(f"MLP: kind must be 'swiglu' or 'gelu', got {kind!r}")
        self.kind = kind
        kw = dict(
            in_names=("embed",),
            out_names=("mlp",),
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

        def adapter(name):
            return lora if name in lora_targets else None

        self.up = Linear(d_model, mlp_dim, lora=adapter("up"), **kw)
        self.gate = (
            Linear(d_model, mlp_dim, lora=adapter("gate"), **kw) if kind == "swiglu" else None
        )
        self.down = Linear(
            mlp_dim,
            d_model,
            in_names=("mlp",),
            out_names=("embed",),
            use_bias=use_bias,
            lora=adapter("down"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "swiglu":
            h = jax.nn.silu(self.gate(x)) * self.up(x)
        else:
            h = jax.nn.gelu(self.up(x), approximate=True)
        h = constrain(h, ("batch", "length", "act_mlp"))
        return self.down(h)
