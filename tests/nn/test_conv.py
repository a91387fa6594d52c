"""Convolution layers: im2col against XLA, GroupNorm against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlgen.nn.conv import GroupNorm, conv2d


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
    ref = (xr - xr.mean(axis=(1, 3), keepdims=True)) / np.sqrt(
        xr.var(axis=(1, 3), keepdims=True) + 1e-5
    )
    ref = ref.reshape(2, 4, 4, 8) * np.linspace(0.5, 2.0, 8) + np.linspace(-1.0, 1.0, 8)
    np.testing.assert_allclose(gn(x), ref, rtol=1e-5, atol=1e-5)
