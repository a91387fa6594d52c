"""UNet and DiT: logical names on every parameter, sharded shapes, outputs, dropout,
unrolled layers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgen import sharding
from mlgen.config import MeshConfig
from mlgen.models.dit import PRESETS as DIT
from mlgen.models.dit import DiT
from mlgen.models.unet import PRESETS as UNETS
from mlgen.models.unet import UNet

MODELS = [
    (UNet, dataclasses.replace(UNETS["unet-tiny"], num_classes=3, dropout=0.1)),
    (DiT, dataclasses.replace(DIT["dit-tiny"], num_classes=3, dropout=0.1)),
]


@pytest.mark.parametrize("cls,cfg", MODELS, ids=["unet", "dit"])
def test_models_shard_and_run(cls, cfg):
    """Every parameter has logical names that shard on a 4x2 fsdp mesh; output shape; dropout."""
    mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=2, rules="fsdp"), jax.devices())
    with sharding.use(mesh, "fsdp"):
        abs_state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), nnx.Param)[1]
        for path, v in nnx.to_flat_state(abs_state):
            names = v.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(v.shape), (path, names)
        shardings = nnx.get_named_sharding(
            abs_state, mesh
        )  # raises on a name used twice in one param
        assert any("fsdp" in jax.tree.leaves(tuple(s.spec)) for s in jax.tree.leaves(shardings))
    # one compiled init (eager init runs op by op: slow)
    graphdef = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]
    params = jax.jit(
        lambda: nnx.to_pure_dict(nnx.split(cls(cfg, rngs=nnx.Rngs(0)), nnx.Param)[1])
    )()
    x = jax.random.normal(jax.random.key(1), (4, cfg.image_size, cfg.image_size, 1))
    t = jnp.linspace(1.0, 999.0, 4)
    y = jnp.arange(4)  # 3 = the null class
    run = jax.jit(lambda p, key: nnx.merge(graphdef, p)(x, t, y, rng=key))
    out = run(params, jax.random.key(0))
    assert out.shape == x.shape
    np.testing.assert_allclose(out, 0.0)  # zero-initialised output layers
    # perturb every parameter at random so that dropout shows in the output
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    noisy = jax.tree.unflatten(
        tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    )
    a, b = run(noisy, jax.random.key(1)), run(noisy, jax.random.key(2))
    assert np.max(np.abs(a - b)) > 1e-2 * np.max(np.abs(a))
    np.testing.assert_allclose(a, run(noisy, jax.random.key(1)))
    if cls is DiT:  # unrolled layers: the same parameters (still stacked) give the same output
        unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
        unrolled_def = nnx.split(
            nnx.eval_shape(lambda: cls(unrolled_cfg, rngs=nnx.Rngs(0))), nnx.Param
        )[0]
        run_unrolled = jax.jit(lambda p, key: nnx.merge(unrolled_def, p)(x, t, y, rng=key))
        np.testing.assert_allclose(run_unrolled(noisy, jax.random.key(1)), a, rtol=1e-5, atol=1e-5)

        def loops(f):
            return f.lower(noisy, jax.random.key(1)).as_text().count("stablehlo.while")

        assert loops(run_unrolled) == loops(run) - 1  # the layer loop is gone
