"""Image data (digits, PNG folders, resumable iterators), conv layers, UNet / DiT, digit scoring."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mlgen import sharding
from mlgen.config import ConfigError, MeshConfig
from mlgen.data.images import ImageDataConfig, load_arrays, make_image_data, save_grid
from mlgen.evaluation.digits import frechet_distance
from mlgen.models.dit import PRESETS as DIT
from mlgen.models.dit import DiT
from mlgen.models.unet import PRESETS as UNETS
from mlgen.models.unet import UNet
from mlgen.nn.conv import GroupNorm, conv2d


# ----------------------------------------------------------------------------- data
def test_digits_batches_and_resume():
    cfg = ImageDataConfig(batch_size=16)
    it = make_image_data(cfg, split="train", seed=3)
    b = next(it)
    assert b["images"].shape == (16, 16, 16, 1) and b["images"].dtype == np.float32
    assert b["labels"].shape == (16,) and b["labels"].dtype == np.int32
    assert -1.0 <= b["images"].min() < -0.9 and 0.9 < b["images"].max() <= 1.0
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it2 = make_image_data(cfg, split="train", seed=3)
    it2.set_state(state)
    for w in want:
        got = next(it2)
        np.testing.assert_array_equal(got["images"], w["images"])
        np.testing.assert_array_equal(got["labels"], w["labels"])


def test_digits_splits_are_disjoint_and_hosts_split_batches():
    cfg = ImageDataConfig(batch_size=8)
    tr, _ = load_arrays(cfg, "train")
    va, _ = load_arrays(cfg, "validation")
    assert len(tr) + len(va) == 1797 and len(va) == 180
    flat = {x.tobytes() for x in tr}
    assert sum(x.tobytes() in flat for x in va) <= 2  # a few digits are exact duplicates in the source
    h0 = next(make_image_data(cfg, split="validation", seed=0, process_index=0, process_count=2))
    h1 = next(make_image_data(cfg, split="validation", seed=0, process_index=1, process_count=2))
    assert h0["images"].shape[0] == 4 and not np.array_equal(h0["images"], h1["images"])


def test_png_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    cfg = ImageDataConfig(source="folder", path=str(tmp_path), image_size=8, channels=3, batch_size=4,
                          val_fraction=0.2, hflip=True)
    b = next(make_image_data(cfg, split="train", seed=0))
    assert b["images"].shape == (4, 8, 8, 3) and set(b["labels"].tolist()) <= {0, 1}
    assert b["images"].min() >= -1.0 and b["images"].max() <= 1.0
    v = next(make_image_data(cfg, split="validation", seed=0))  # 2 images repeated to fill a batch
    assert v["images"].shape == (4, 8, 8, 3)
    with pytest.raises(ConfigError, match="^path:"):
        ImageDataConfig(source="folder", path=str(tmp_path / "nope")).validate()


def test_save_grid(tmp_path):
    x = np.linspace(-1, 1, 6 * 4 * 4).reshape(6, 4, 4, 1)
    p = save_grid(x, tmp_path / "g.png", ncol=3, scale=1)
    assert Image.open(p).size == (3 * 5 + 1, 2 * 5 + 1)


# ----------------------------------------------------------------------------- layers
@pytest.mark.parametrize("stride", [1, 2])
def test_im2col_conv_matches_xla(stride):
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (2, 8, 8, 5))
    w = jax.random.normal(k2, (3, 3, 5, 7))
    ref = conv2d(x, w, stride=stride, impl="xla")
    np.testing.assert_allclose(conv2d(x, w, stride=stride, impl="im2col"), ref, atol=1e-4)
    g = jax.grad(lambda w, impl: jnp.sum(conv2d(x, w, stride=stride, impl=impl) ** 2))
    np.testing.assert_allclose(g(w, "im2col"), g(w, "xla"), rtol=1e-4, atol=1e-3)


def test_group_norm():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)) * 3 + 1
    y = GroupNorm(8, 4)(x)
    g = np.asarray(y).reshape(2, 16, 4, 2)
    np.testing.assert_allclose(g.mean(axis=(1, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(g.var(axis=(1, 3)), 1, atol=1e-3)
    # with a scale and bias, against NumPy's two-axis reduction of [B, HW, G, C/G]
    gn = GroupNorm(8, 4)
    gn.scale[...] = jnp.linspace(0.5, 2.0, 8)
    gn.bias[...] = jnp.linspace(-1.0, 1.0, 8)
    xr = np.asarray(x).reshape(2, 16, 4, 2)
    ref = (xr - xr.mean(axis=(1, 3), keepdims=True)) / np.sqrt(xr.var(axis=(1, 3), keepdims=True) + 1e-5)
    ref = ref.reshape(2, 4, 4, 8) * np.linspace(0.5, 2.0, 8) + np.linspace(-1.0, 1.0, 8)
    np.testing.assert_allclose(gn(x), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- models
MODELS = [(UNet, dataclasses.replace(UNETS["unet-tiny"], num_classes=3, dropout=0.1)),
          (DiT, dataclasses.replace(DIT["dit-tiny"], num_classes=3, dropout=0.1))]


@pytest.mark.parametrize("cls,cfg", MODELS, ids=["unet", "dit"])
def test_models_shard_and_run(cls, cfg):
    """Every parameter has logical names that shard on a 4x2 fsdp mesh; output shape; dropout."""
    mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=2, rules="fsdp"), jax.devices())
    with sharding.use(mesh, "fsdp"):
        abs_state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), nnx.Param)[1]
        for path, v in nnx.to_flat_state(abs_state):
            names = v.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(v.shape), (path, names)
        shardings = nnx.get_named_sharding(abs_state, mesh)  # raises on a name used twice in one param
        assert any("fsdp" in jax.tree.leaves(tuple(s.spec)) for s in jax.tree.leaves(shardings))
    # one compiled init (eager init runs op by op: slow)
    graphdef = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.split(cls(cfg, rngs=nnx.Rngs(0)), nnx.Param)[1]))()
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
    noisy = jax.tree.unflatten(tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    a, b = run(noisy, jax.random.key(1)), run(noisy, jax.random.key(2))
    assert np.max(np.abs(a - b)) > 1e-2 * np.max(np.abs(a))
    np.testing.assert_allclose(a, run(noisy, jax.random.key(1)))
    if cls is DiT:  # unrolled layers: the same parameters (still stacked) give the same output
        unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
        unrolled_def = nnx.split(nnx.eval_shape(lambda: cls(unrolled_cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]
        run_unrolled = jax.jit(lambda p, key: nnx.merge(unrolled_def, p)(x, t, y, rng=key))
        np.testing.assert_allclose(run_unrolled(noisy, jax.random.key(1)), a, rtol=1e-5, atol=1e-5)
        loops = lambda f: f.lower(noisy, jax.random.key(1)).as_text().count("stablehlo.while")
        assert loops(run_unrolled) == loops(run) - 1  # the layer loop is gone


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, rng.standard_normal((4000, 3))) < 0.02
    assert frechet_distance(a, rng.standard_normal((4000, 3)) + 1.0) == pytest.approx(3.0, abs=0.1)
