"""Sequence parallelism: a mesh with seq > 1 shards the LM's length and uses ring attention.

The loss and its gradients equal those on one device without ``seq`` (packed rows with
several documents, so segment ids and per-document RoPE positions cross device boundaries).
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from mlgen import sharding
from mlgen.config import MeshConfig
from mlgen.models.dit import PRESETS as DIT
from mlgen.ops.attention import AttentionConfig, recording
from mlgen.runs import setup
from tests.helpers import random_lm_batch, tiny_lm_config


def _loss_and_grads(cfg, devices=None, grads=True):
    s = setup(cfg, devices=devices)
    batch = random_lm_batch(batch=2, seq=32, docs=3)
    loss_fn = s.task.make_loss(s.graphdef)
    ms = s.state["model_state"]
    with sharding.use(s.mesh, cfg.mesh.rules):
        b = sharding.put_batch(batch, s.mesh, s.task.batch_axes, cfg.mesh.rules)
        if s.mesh.shape["seq"] > 1:
            assert b["inputs"].sharding.spec[1] == "seq"
        if not grads:
            loss, _ = jax.jit(loss_fn)(s.state["params"], ms, b, jax.random.key(0))
            return float(loss), None
        (loss, _), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
            s.state["params"], ms, b, jax.random.key(0)
        )
    return float(loss), jax.tree.map(np.asarray, g)


@functools.cache
def _reference():
    return _loss_and_grads(
        tiny_lm_config(mesh=MeshConfig(data=1), num_layers=1), devices=jax.devices()[:1]
    )


def test_seq_mesh_switches_auto_backend_to_ring():
    """``auto`` picks ring attention by itself under a mesh with seq > 1
    (no task rewrites the config)."""
    cfg = tiny_lm_config(mesh=MeshConfig(data=1, seq=8), attention=AttentionConfig())
    s = setup(cfg, abstract=True)
    assert s.config.model.attention.backend == "auto"
    batch = random_lm_batch(batch=2, seq=32, docs=3)
    with sharding.use(s.mesh, s.rules), recording() as calls:
        b = sharding.put_batch(batch, s.mesh, s.task.batch_axes, s.rules)
        jax.eval_shape(
            s.task.make_loss(s.graphdef),
            s.state["params"],
            s.state["model_state"],
            b,
            jax.random.key(0),
        )
    assert [name for name, _ in calls] == ["ring"] and calls[0][1].seq_shards == 8


@pytest.mark.parametrize(
    "mesh, grads",
    [
        (
            MeshConfig(data=1, seq=8, rules="fsdp_sp"),
            False,
        ),  # gradients: the op tests and the case below
        (MeshConfig(data=2, seq=4), True),  # rules="auto"
    ],
    ids=["seq8", "data2_seq4"],
)
def test_loss_matches_mesh_without_seq(mesh, grads):
    ref, ref_g = _reference()
    got, got_g = _loss_and_grads(
        tiny_lm_config(mesh=mesh, attention=AttentionConfig(), num_layers=1), grads=grads
    )
    assert abs(got - ref) <= 1e-5, (got, ref)
    if grads:
        for w, g in zip(jax.tree.leaves(ref_g), jax.tree.leaves(got_g)):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_dit_shards_its_patches_over_seq_with_ring_attention():
    """The DiT under a mesh with seq > 1: its token axis is ``length`` (sharded over seq), ``auto``
    picks ring attention for it as for the LM, and the loss equals the single-device one."""
    from tests.helpers import tiny_digits_config

    base = tiny_digits_config("/tmp/mlgen-dit-seq")
    base = dataclasses.replace(base, model=dataclasses.replace(DIT["dit-tiny"], num_classes=10))
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
        "labels": rng.integers(0, 10, (16,)).astype(np.int32),
    }

    def loss(cfg, devices=None):
        s = setup(cfg, devices=devices)
        with sharding.use(s.mesh, s.rules), recording() as calls:
            b = sharding.put_batch(batch, s.mesh, s.task.batch_axes, s.rules)
            value, _ = jax.jit(s.task.make_loss(s.graphdef))(
                s.state["params"], s.state["model_state"], b, jax.random.key(0)
            )
        return float(value), [name for name, _ in calls]

    ref, ref_calls = loss(
        dataclasses.replace(base, mesh=MeshConfig(data=1)), devices=jax.devices()[:1]
    )
    got, calls = loss(dataclasses.replace(base, mesh=MeshConfig(data=4, seq=2)))
    assert ref_calls == ["xla"] and calls == ["ring"]
    assert abs(got - ref) <= 1e-5, (got, ref)
