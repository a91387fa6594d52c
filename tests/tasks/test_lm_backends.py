"""`model.attention.backend` switches the LM between backends; each trains to the same losses.

Pallas kernels run in interpret mode here (`model.attention.interpret=true`): this checks the
kernels' numbers inside the full model and its gradients, not their speed or compilation for
real hardware (tests/ops covers TPU compilation and CUDA lowering).
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from mlgen import sharding
from mlgen.config import MeshConfig
from mlgen.ops.attention import AttentionConfig
from mlgen.runs import setup
from mlgen.train.step import make_train_step
from tests.helpers import random_lm_batch, tiny_lm_config


@functools.cache  # the reference's losses: computed once per worker, not once per backend
def _losses(backend: str, steps: int = 2) -> tuple[float, ...]:
    cfg = tiny_lm_config(
        mesh=MeshConfig(data=-1, rules="dp"),
        num_layers=1,
        d_model=64,
        num_heads=4,
        num_kv_heads=2,
        attention=AttentionConfig(backend=backend, interpret=backend.startswith("pallas")),
    )
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, warmup_steps=0))
    s = setup(cfg, devices=jax.devices()[:1])
    step = jax.jit(make_train_step(s.task.make_loss(s.graphdef), s.optimizer))
    batch = random_lm_batch(batch=1, seq=24, docs=2)
    state, out = s.state, []
    with sharding.use(s.mesh, cfg.mesh.rules):
        b = sharding.put_batch(batch, s.mesh, s.task.batch_axes, cfg.mesh.rules)
        for _ in range(steps):
            state, m = step(state, b, jax.random.key(0))
            out.append(float(m["loss"]))
    return tuple(out)


@pytest.mark.parametrize("backend", ["xla", "blockwise", "pallas_gpu", "pallas_tpu"])
def test_lm_trains_to_the_same_loss_with_every_backend(backend):
    ref = _losses("reference")
    got = _losses(backend)
    assert ref[-1] < ref[0]
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
