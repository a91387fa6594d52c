"""Cross entropy, whole and chunked over positions: same values and gradients, less memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlgen import sharding
from mlgen.config import ConfigError, MeshConfig
from mlgen.ops.losses import chunked_cross_entropy, cross_entropy
from mlgen.runs import setup
from tests.helpers import random_lm_batch, tiny_lm_config


def _problem(B=2, T=32, D=16, V=50, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((D, V)) * 0.5, jnp.float32)
    y = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32)
    return h, w, y, mask


@pytest.mark.parametrize("chunk", [8, 32])
def test_chunked_matches_whole_values_metrics_and_grads(chunk):
    h, w, y, mask = _problem()

    def whole(h, w):
        return cross_entropy(h @ w, y, mask, z_loss=1e-2)

    def chunked(h, w):
        return chunked_cross_entropy(h, lambda x: x @ w, y, mask, z_loss=1e-2, chunk=chunk)

    (l0, m0), g0 = jax.value_and_grad(whole, argnums=(0, 1), has_aux=True)(h, w)
    (l1, m1), g1 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(h, w)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for k in ("ce", "z_loss", "accuracy", "tokens"):
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-6, err_msg=k)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(m0["tokens"]) == float(mask.sum()) < mask.size  # the mask really masks


def test_chunked_peak_memory_is_a_chunk_of_logits():
    B, T, D, V, chunk = 2, 256, 32, 8192, 32
    h, w, y, mask = _problem(B, T, D, V)
    logits_bytes = B * T * V * 4

    def temp(loss):
        grad = jax.jit(jax.grad(lambda h, w: loss(h, w)[0], argnums=(0, 1)))
        return grad.lower(h, w).compile().memory_analysis().temp_size_in_bytes

    whole = temp(lambda h, w: cross_entropy(h @ w, y, mask))
    chunked = temp(lambda h, w: chunked_cross_entropy(h, lambda x: x @ w, y, mask, chunk=chunk))
    assert whole >= logits_bytes, (whole, logits_bytes)  # [B, T, V] float32 lives in the plain loss
    # One chunk's logits are 1/8 of them; with the softmax gradient and the [D, V] weight
    # gradient the chunked program plans ~5.4 MB here against ~17+ MB.
    assert chunked < whole / 3, (chunked, whole)


def test_chunk_must_divide_length():
    h, w, y, mask = _problem(T=32)
    with pytest.raises(ValueError, match="chunk=12 must be a positive divisor of the length T=32"):
        chunked_cross_entropy(h, lambda x: x @ w, y, mask, chunk=12)


def _lm_loss(cfg):
    s = setup(cfg)
    batch = random_lm_batch(docs=3)
    with sharding.use(s.mesh, cfg.mesh.rules):
        b = sharding.put_batch(batch, s.mesh, s.task.batch_axes, cfg.mesh.rules)
        f = jax.jit(jax.value_and_grad(s.task.make_loss(s.graphdef), has_aux=True))
        (loss, (metrics, _)), grads = f(
            s.state["params"], s.state["model_state"], b, jax.random.key(0)
        )
    return float(loss), metrics, grads


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])  # untied head / tied embedding
def test_lm_task_loss_chunk_matches_whole(flavour):
    cfg = tiny_lm_config(flavour=flavour)
    cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, z_loss=1e-3))
    l0, m0, g0 = _lm_loss(cfg)
    l1, m1, g1 = _lm_loss(
        dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, loss_chunk=8))
    )
    assert abs(l1 - l0) <= 1e-5 * abs(l0), (l1, l0)
    np.testing.assert_allclose(m1["accuracy"], m0["accuracy"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_loss_chunk_config_errors_name_the_field():
    cfg = tiny_lm_config()
    bad = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, loss_chunk=5))
    with pytest.raises(
        ConfigError, match=r"objective\.loss_chunk: 5 does not divide data\.seq_len=32"
    ):
        setup(bad)
    sp = dataclasses.replace(
        tiny_lm_config(mesh=MeshConfig(data=-1, seq=2, rules="fsdp_sp")),
        objective=dataclasses.replace(cfg.objective, loss_chunk=8),
    )
    with pytest.raises(ConfigError, match=r"objective\.loss_chunk: chunks the length axis"):
        setup(sp)
