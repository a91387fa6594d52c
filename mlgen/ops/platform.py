"""The platform a computation is compiled for (not the host it is traced on), and the
matmul form that platform runs best.

``mlgen plan`` compiles for a TPU pod on a CPU host, so "which platform" is read from the
arrays and the active mesh at trace time; the attention API picks its kernels by it, and
:func:`dense` picks its dot form by it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def platform(*arrays) -> str:
    """The platform a call is compiled for (``target_platform``'s first value)."""
    return target_platform(*arrays)[0]


def target_platform(*arrays) -> tuple[str, bool]:
    """``(platform, known)``: the platform ``arrays`` are computed on, read at call time.

    Taken from the compile target, not the host: concrete arrays' devices; else the mesh of a
    traced input's sharding (``jax.jit(f).lower(<TPU-topology inputs>)`` on a CPU host says
    ``tpu``); else the active mesh (``jax.set_mesh`` / ``use_abstract_mesh``, as the trainer
    and ``mlgen plan`` trace under). ``known`` is False when none of these says, and the answer
    is only the host's default backend (``lower(lowering_platforms=("cuda",))`` on a CPU host).
    """
    for x in arrays:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            devices = getattr(x.sharding, "device_set", None)
            if devices:
                return _normal(next(iter(devices)).platform), True
        aval = jax.typeof(x) if hasattr(x, "dtype") else None
        name = _mesh_platform(getattr(getattr(aval, "sharding", None), "mesh", None))
        if name is not None:
            return name, True
    name = _mesh_platform(jax.sharding.get_abstract_mesh())
    if name is not None:
        return name, True
    return _normal(jax.default_backend()), not any(isinstance(x, jax.core.Tracer) for x in arrays)


def _mesh_platform(mesh) -> str | None:
    if mesh is None or getattr(mesh, "empty", True):
        return None
    device = getattr(mesh, "abstract_device", None)
    if device is not None and getattr(device, "platform", None):
        return _normal(device.platform)
    devices = getattr(mesh, "devices", None)  # a concrete Mesh
    if devices is not None and getattr(devices, "size", 0):
        return _normal(devices.flat[0].platform)
    return None


def _normal(name: str) -> str:
    return "gpu" if name in ("cuda", "rocm", "gpu") else name


def _seq_sharded() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not getattr(mesh, "empty", True) and dict(mesh.shape).get("seq", 1) > 1


def dense(x: jax.Array, w: jax.Array, n_in: int, *, out_dtype=None) -> jax.Array:
    """``x``'s last ``n_in`` axes contracted with ``w``'s first ``n_in``: ``[..., IN] x
    [IN, OUT] -> [..., OUT]`` (``IN``/``OUT`` may be several axes each).

    On CPU (without a sequence-sharded mesh) the batch axes and each feature group are
    flattened into one 2-D dot. XLA:CPU runs the weight gradient of a dot with several batch
    axes (``einsum("btc,cd->btd")``, whose transpose contracts ``b`` and ``t``) as a physical
    transpose of the activation gradient followed by the dot, and its transpose loop is slow:
    ~100 ms for an 8 MB ``[2048, 1024]`` float32 array on this 2-core CPU, 16-23% of an LM
    train step (``mlgen bench train --flavour llama --mlp 1024``, profiled op by op). A 2-D
    dot's transposed operands are read in place, so the copies go. Elsewhere the einsum stays:
    TPU and GPU layouts handle it, and flattening ``[B, T]`` would break a ``seq`` sharding.
    """
    n_out = w.ndim - n_in
    letters = "abcdefghijklmnopqrstuvwxyz"
    if platform(x) == "cpu" and not _seq_sharded():
        lead, ins, outs = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
        k, n = math.prod(ins), math.prod(outs)
        y = jnp.dot(x.reshape(-1, k), w.reshape(k, n), preferred_element_type=out_dtype)
        return y.reshape(*lead, *outs)
    batch = letters[: x.ndim - n_in]
    ins = letters[x.ndim - n_in : x.ndim]
    outs = letters[x.ndim : x.ndim + n_out]
    return jnp.einsum(
        f"{batch}{ins},{ins}{outs}->{batch}{outs}", x, w, preferred_element_type=out_dtype
    )
