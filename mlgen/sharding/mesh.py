"""Device mesh from config: one named axis per ``MeshConfig`` axis, all of AxisType.Auto."""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from mlgen.config import ConfigError, MeshConfig, prefixed


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
    try:
        return jax.make_mesh(shape, axes, axis_types=types, devices=devices)
    except NotImplementedError:  # no assignment of the axes to the physical torus's sides
        used = {a: n for a, n in sizes.items() if n > 1}
        raise ConfigError(
            f"mesh: {used} does not map onto the torus of these {len(devices)} "
            f"{devices[0].device_kind} chips: every mesh axis larger than 1 must be a product "
            "of some of the topology's sides (v5p:4x4x4: 4, 16 or 64)"
        ) from None
