"""Samplers with the exact denoiser of Gaussian data; CFG limits;
no recompiles for steps / guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgen.models.dit import PRESETS as DIT
from mlgen.models.dit import DiT
from mlgen.models.unet import PRESETS, UNet
from mlgen.objectives import schedules
from mlgen.objectives.diffusion import from_x0_eps
from mlgen.samplers import diffusion as sd

D = 3
MU = np.array([0.5, -0.3, 0.1], np.float32)
A = np.array([[0.6, 0.0, 0.0], [0.3, 0.4, 0.0], [-0.2, 0.1, 0.3]], np.float32)
COV = A @ A.T


def gaussian_denoiser(schedule, prediction):
    """The exact model for x0 ~ N(MU, COV): E[x0 | x_t], returned in ``prediction`` space."""
    mu, cov = jnp.asarray(MU), jnp.asarray(COV)

    def denoise(x, mt, labels):
        del labels
        t = mt / schedule.num_train_steps
        a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
        xf = x.reshape(x.shape[0], D)
        # E[x0|x] = mu + a cov (a^2 cov + s^2 I)^-1 (x - a mu), per example
        m = a[:, :, None] ** 2 * cov + s[:, :, None] ** 2 * jnp.eye(D)
        x0 = mu + a * jnp.einsum(
            "ij,bj->bi", cov, jnp.linalg.solve(m, (xf - a * mu)[..., None])[..., 0]
        )
        eps = (xf - a * x0) / jnp.maximum(s, 1e-12)
        out = from_x0_eps(x0, eps, a[:, 0], s[:, 0], prediction)
        return out.reshape(x.shape)

    return denoise


CASES = [  # schedule, prediction, sampler, steps
    ("linear", "eps", "ddpm", 1000),
    ("cosine", "v", "ddim", 100),
    ("cosine", "eps", "heun", 40),
    ("linear", "x0", "euler", 200),
    ("flow", "flow", "heun", 30),
    ("flow", "flow", "ddpm", 300),
]


@pytest.mark.parametrize("schedule,prediction,sampler,steps", CASES)
def test_exact_denoiser_reproduces_gaussian(schedule, prediction, sampler, steps):
    s = schedules.make(schedule)
    n = 4000
    x_T = jax.random.normal(jax.random.key(1), (n, 1, D, 1))
    run = jax.jit(
        lambda xt, k: sd.sample_fn(
            gaussian_denoiser(s, prediction),
            s,
            prediction=prediction,
            sampler=sampler,
            x_T=xt,
            key=k,
            steps=steps,
            clip=False,
            max_steps=1000,
        )
    )
    x = np.asarray(run(x_T, jax.random.key(2))).reshape(n, D)
    np.testing.assert_allclose(x.mean(0), MU, atol=0.04)
    np.testing.assert_allclose(np.cov(x.T), COV, atol=0.04)


def _toy_conditional(x, mt, labels):
    """A label-dependent fake 'eps' model: cond and uncond outputs differ."""
    shift = jnp.where(labels == 10, 0.0, 0.1 * (labels.astype(jnp.float32) + 1.0))
    return 0.9 * x + shift[:, None, None, None] + 1e-4 * mt[:, None, None, None]


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_guidance_zero_and_one(sampler):
    s = schedules.make("cosine")
    x_T = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
    labels = jnp.array([0, 3, 5, 9])
    kw = dict(
        prediction="eps",
        sampler=sampler,
        x_T=x_T,
        key=jax.random.key(1),
        steps=10,
        null_label=10,
        max_steps=16,
    )
    cond_only = sd.sample_fn(lambda x, t, y: _toy_conditional(x, t, labels), s, **kw)
    uncond_only = sd.sample_fn(
        lambda x, t, y: _toy_conditional(x, t, jnp.full_like(labels, 10)), s, **kw
    )
    g1 = sd.sample_fn(_toy_conditional, s, labels=labels, guidance=1.0, **kw)
    g0 = sd.sample_fn(_toy_conditional, s, labels=labels, guidance=0.0, **kw)
    g3 = sd.sample_fn(_toy_conditional, s, labels=labels, guidance=3.0, **kw)
    np.testing.assert_allclose(g1, cond_only, atol=1e-5)
    np.testing.assert_allclose(g0, uncond_only, atol=1e-5)
    assert not np.allclose(g3, g1, atol=1e-3)


@pytest.mark.parametrize(
    "model_cls,cfg", [(UNet, PRESETS["unet-tiny"]), (DiT, DIT["dit-tiny"])], ids=["unet", "dit"]
)
def test_steps_and_guidance_do_not_recompile(model_cls, cfg):
    import dataclasses

    cfg = dataclasses.replace(cfg, num_classes=3)
    model = model_cls(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    kw = dict(
        schedule="cosine",
        prediction="eps",
        shape=(3, 8, 8, 1),
        labels=[0, 1, 2],
        num_classes=3,
        sampler="ddim",
        max_steps=6,
    )
    before = sd.TRACE_COUNT["sample"]
    a = sd.sample(graphdef, params, key=jax.random.key(0), steps=2, guidance=1.0, **kw)
    b = sd.sample(graphdef, params, key=jax.random.key(1), steps=5, guidance=4.0, **kw)
    c = sd.sample(graphdef, params, key=jax.random.key(1), steps=3, guidance=0.0, eta=0.5, **kw)
    assert sd.TRACE_COUNT["sample"] - before == 1
    assert a.shape == b.shape == c.shape == (3, 8, 8, 1)
    assert np.all(np.isfinite(np.asarray(b)))
