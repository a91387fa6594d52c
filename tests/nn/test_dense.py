"""``mlgen.ops.platform.dense``: the 2-D dot on CPU equals the einsum, values and gradients,
and its weight gradient compiles without a physical transpose; under a ``seq``-sharded mesh
(where flattening ``[B, T]`` would break the sharding) the einsum form is kept.

What this does not cover: the einsum form's speed on TPU/GPU (it is what ran there before).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from mlgen.ops import platform


def _einsum(x, w, n_in):
    letters = "abcdefghij"
    b, i, o = x.ndim - n_in, n_in, w.ndim - n_in
    spec = letters[:b] + letters[b : b + i] + "," + letters[b : b + i + o]
    return jnp.einsum(spec + "->" + letters[:b] + letters[b + i : b + i + o], x, w)


@pytest.mark.parametrize(
    "x_shape,w_shape,n_in",
    [((4, 8, 12), (12, 20), 1), ((2, 8, 12), (12, 3, 5), 1), ((2, 8, 3, 4), (3, 4, 12), 2)],
    ids=["btc,cd", "btc,cnh", "btnh,nhd"],
)
def test_dense_matches_einsum_values_and_gradients(x_shape, w_shape, n_in):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w, n_in)))

    np.testing.assert_allclose(platform.dense(x, w, n_in), _einsum(x, w, n_in), rtol=1e-5)
    got = jax.grad(loss(platform.dense), argnums=(0, 1))(x, w)
    want = jax.grad(loss(_einsum), argnums=(0, 1))(x, w)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def _weight_grad_hlo(f, x, w):
    return jax.jit(jax.grad(lambda w: jnp.sum(f(x, w, 1) ** 2))).lower(w).compile().as_text()


def test_cpu_weight_gradient_has_no_transpose():
    x = jnp.ones((8, 64, 32), jnp.float32)
    w = jnp.ones((32, 48), jnp.float32)
    assert " transpose(" in _weight_grad_hlo(_einsum, x, w)  # what the einsum compiles to
    assert " transpose(" not in _weight_grad_hlo(platform.dense, x, w)


def test_seq_sharded_mesh_keeps_the_einsum():
    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    x = jnp.ones((2, 8, 4), jnp.float32)
    w = jnp.ones((4, 6), jnp.float32)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda x, w: platform.dense(x, w, 1))(x, w)
    assert "reshape" not in str(jaxpr) and "dot_general" in str(jaxpr)
    jaxpr = jax.make_jaxpr(lambda x, w: platform.dense(x, w, 1))(x, w)
    assert "reshape" in str(jaxpr)  # no mesh, CPU: the 2-D form
