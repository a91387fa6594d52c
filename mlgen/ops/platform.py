"""The platform a computation is compiled for, not the host it is traced on.

``mlgen plan`` compiles for a TPU pod on a CPU host, so "which platform" is read from the
arrays and the active mesh at trace time; the attention API picks its kernels by it.
"""

from __future__ import annotations

import jax


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
