"""One mixed-precision and rematerialisation policy for every model family.

A run's ``precision`` section and ``remat`` (``mlgen.config``) become a :class:`Policy` that the
task hands to ``Family.build``; the layers take its dtypes as explicit arguments and the model
wraps each block in :meth:`Policy.remat`. Whatever the compute dtype, norms (``mlgen.nn.core``,
``mlgen.nn.conv``), softmax (every ``mlgen.ops.attention`` backend, the KV-cache decode) and the
losses compute in float32; a model's output layer (LM logits, denoiser prediction) accumulates
and returns float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.config import DTYPES, REMATS, ConfigError

__all__ = ["REMAT_POLICIES", "Policy", "check_remat_devices"]

_cp = jax.checkpoint_policies

# What each ``remat`` name saves for the backward pass (everything else is recomputed).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # no rematerialisation: every residual is kept
    "full": _cp.nothing_saveable,  # each block's forward is recomputed in the backward
    # matmul outputs kept, elementwise work recomputed; and a LoRA projection's output, the sum
    # of two matmuls (``mlgen.nn.core.LORA_OUT``): saved once, in place of both matmuls' outputs
    "dots": _cp.save_from_both_policies(_cp.checkpoint_dots, _cp.save_only_these_names("lora_out")),
    # ... but not batched (attention)
    "dots_no_batch": _cp.save_from_both_policies(
        _cp.checkpoint_dots_with_no_batch_dims, _cp.save_only_these_names("lora_out")
    ),
    # dots_no_batch's residuals, kept in host memory instead of device memory.
    "offload": _cp.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host"),
}
assert tuple(REMAT_POLICIES) == REMATS  # the config's names are these

_HOST = "pinned_host"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Policy:
    """Dtypes and rematerialisation of a model.

    Attributes:
      params: parameter (master-weight) dtype: ``"float32"`` | ``"bfloat16"``.
      compute: activation and matmul dtype: ``"float32"`` | ``"bfloat16"``.
      remat: what each block saves for the backward pass (``REMAT_POLICIES``).
    """

    params: str = "float32"
    compute: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        for name, allowed in (("params", DTYPES), ("compute", DTYPES), ("remat", REMATS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"Policy: {name} must be one of {list(allowed)}, got {value!r}")

    @property
    def param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.params)

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype."""
        return jnp.dtype(self.compute)

    def remat_block(self, fn: Callable, *, prevent_cse: bool = True) -> Callable:
        """``fn`` (taking a module first) under ``nnx.remat`` with this policy; ``fn`` itself
        when ``remat="none"``. Inside a scan pass ``prevent_cse=False`` (the scan already keeps
        XLA from merging the recomputation with the forward, and the barrier costs speed)."""
        if self.remat == "none":
            return fn
        return nnx.remat(fn, policy=REMAT_POLICIES[self.remat], prevent_cse=prevent_cse)


def check_remat_devices(remat: str, devices: Iterable[Any]) -> None:
    """``remat="offload"`` needs devices with host memory to offload to (a ``pinned_host``
    memory space): a one-line ``ConfigError`` naming ``remat`` where they have none.

    On CPU the host is the device: offloading moves nothing and XLA drops the transfers, so
    ``offload`` runs as ``dots_no_batch`` does (same numbers, same memory).
    """
    if remat != "offload":
        return
    for d in devices:
        kinds = {m.kind for m in d.addressable_memories()}
        if _HOST not in kinds:
            raise ConfigError(
                f"remat: offload needs host memory ({_HOST!r}) on the devices, which "
                f"{d.platform} devices lack (they have {sorted(kinds)}); use dots_no_batch"
            )
