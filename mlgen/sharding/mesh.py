"""Device mesh from config: axes data, fsdp, tensor, seq, all of AxisType.Auto."""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from mlgen.config import MeshConfig

AXES = MeshConfig.AXES


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """Builds the 4-axis mesh; ``devices`` defaults to ``jax.devices()``.

    Axis sizes come from ``cfg`` with -1 filled in; a size mismatch is a ConfigError naming
    the mesh field. Auto axis types keep GSPMD propagation (``jax.make_mesh`` defaults to
    Explicit on this JAX).
    """
    devices = list(jax.devices() if devices is None else devices)
    from mlgen.config import _prefixed

    sizes = _prefixed("mesh", cfg.resolve, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    if devices[0].platform in ("cpu",) or len(devices) == 1:
        arr = np.asarray(devices).reshape(shape)
        return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
