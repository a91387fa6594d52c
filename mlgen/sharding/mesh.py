"""Device mesh from config: one named axis per ``MeshConfig`` axis, all of AxisType.Auto."""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from mlgen.config import MeshConfig, prefixed


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """Builds the mesh over ``MeshConfig.AXES``; ``devices`` defaults to ``jax.devices()``.

    Axis sizes come from ``cfg`` with -1 filled in; a size mismatch is a ConfigError naming
    the mesh field. Auto axis types keep GSPMD propagation (``jax.make_mesh`` defaults to
    Explicit on this JAX).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = prefixed("mesh", cfg.resolve, len(devices))
    axes = MeshConfig.AXES
    shape = tuple(sizes[a] for a in axes)
    types = (AxisType.Auto,) * len(axes)
    if devices[0].platform == "cpu" or len(devices) == 1:
        return Mesh(np.asarray(devices).reshape(shape), axes, axis_types=types)
    return jax.make_mesh(shape, axes, axis_types=types, devices=devices)
