"""Schedules against diffusers' definitions; exact prediction conversions; the loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlgen.config import ConfigError
from mlgen.objectives import schedules
from mlgen.objectives.diffusion import (
    PREDICTIONS,
    DiffusionObjectiveConfig,
    SamplerConfig,
    from_x0_eps,
    loss_weight,
    to_x0_eps,
)


# diffusers' definitions, written out (diffusers.schedulers.scheduling_ddpm, float32 torch).
def _diffusers_betas(name, n=1000):
    if name == "linear":
        return np.linspace(1e-4, 0.02, n, dtype=np.float32)
    if name == "scaled_linear":
        return np.linspace(0.00085**0.5, 0.012**0.5, n, dtype=np.float32) ** 2
    if name == "squaredcos_cap_v2":

        def f(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], np.float32)
    raise ValueError(name)


def _cumprod_f32(betas):
    out, acc = np.empty_like(betas), np.float32(1.0)
    for i, b in enumerate(betas):
        acc = np.float32(acc * np.float32(1.0 - b))
        out[i] = acc
    return out


# Values printed by diffusers 0.42.1 (DDPMScheduler(...).alphas_cumprod[[0, 99, 499, 998, 999]]).
GOLDEN = {
    "linear": [0.999899983, 0.897017956, 0.078587234, 4.11819419e-05, 4.03583035e-05],
    "squaredcos_cap_v2": [0.999958694, 0.972092688, 0.493843466, 2.42876627e-06, 2.42873499e-09],
    "scaled_linear": [0.999149978, 0.895462453, 0.27766943, 0.00471669575, 0.00466009509],
}
OURS = {"linear": "linear", "squaredcos_cap_v2": "cosine", "scaled_linear": "scaled_linear"}


@pytest.mark.parametrize("theirs", sorted(OURS))
def test_tables_equal_diffusers(theirs):
    s = schedules.make(OURS[theirs], 1000)
    betas = _diffusers_betas(theirs)
    np.testing.assert_allclose(s.betas, betas, atol=1e-6, rtol=0)
    np.testing.assert_allclose(s.alphas_cumprod, _cumprod_f32(betas), atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        s.alphas_cumprod[[0, 99, 499, 998, 999]], GOLDEN[theirs], atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear", "sigmoid"])
def test_continuous_functions_pass_through_the_table(name):
    s = schedules.make(name, 1000)
    t = np.arange(1, 1001) / 1000
    np.testing.assert_allclose(s.alpha_bar(t), s.alphas_cumprod, rtol=1e-6)
    tj = jnp.asarray(t, jnp.float32)
    np.testing.assert_allclose(
        np.asarray(s.alpha(tj)) ** 2 + np.asarray(s.sigma(tj)) ** 2, 1.0, atol=1e-6
    )
    ls = np.asarray(s.log_snr(jnp.linspace(0.001, 1.0, 500)))
    assert np.all(np.diff(ls) < 0)  # strictly decreasing
    assert s.alpha_bar(0.0) == pytest.approx(1.0)


def test_cosine_table_follows_closed_form():
    s = schedules.make("cosine", 1000)
    t = np.arange(1, 990) / 1000
    closed = schedules.cosine_alpha_bar(t) / schedules.cosine_alpha_bar(0.0)
    np.testing.assert_allclose(s.alphas_cumprod[:989], closed, rtol=1e-5)


def test_flow_path():
    s = schedules.make("flow")
    t = jnp.array([0.0, 0.25, 1.0])
    np.testing.assert_allclose(s.alpha(t), [1.0, 0.75, 0.0])
    np.testing.assert_allclose(s.sigma(t), [0.0, 0.25, 1.0])
    assert s.betas is None and not s.discrete


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", ["cosine", "linear", "flow"])
def test_conversions_round_trip(prediction, schedule):
    s = schedules.make(schedule)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (6, 4, 4, 1))
    eps = jax.random.normal(k2, (6, 4, 4, 1))
    t = jnp.array([0.02, 0.1, 0.3, 0.5, 0.7, 0.95])
    a, sg = s.alpha(t), s.sigma(t)
    x_t = a[:, None, None, None] * x0 + sg[:, None, None, None] * eps
    target = from_x0_eps(x0, eps, a, sg, prediction)
    x0_b, eps_b = to_x0_eps(target, x_t, a, sg, prediction)
    np.testing.assert_allclose(x0_b, x0, atol=2e-4)
    np.testing.assert_allclose(eps_b, eps, atol=2e-4)
    # and between prediction types, through (x0, eps)
    for other in PREDICTIONS:
        o = from_x0_eps(x0_b, eps_b, a, sg, other)
        np.testing.assert_allclose(o, from_x0_eps(x0, eps, a, sg, other), atol=5e-4)


def test_min_snr_weights():
    cfg = DiffusionObjectiveConfig(prediction="eps", loss_weighting="min_snr", min_snr_gamma=5.0)
    s = cfg.make_schedule()
    t = jnp.linspace(0.001, 1.0, 200)
    a, sg = s.alpha(t), s.sigma(t)
    snr = a**2 / sg**2
    np.testing.assert_allclose(loss_weight(a, sg, cfg), jnp.minimum(snr, 5.0) / snr, rtol=1e-5)
    cfg_v = DiffusionObjectiveConfig(prediction="v", loss_weighting="min_snr", min_snr_gamma=5.0)
    np.testing.assert_allclose(
        loss_weight(a, sg, cfg_v), jnp.minimum(snr, 5.0) / (snr + 1), rtol=1e-5
    )
    cfg_x0 = DiffusionObjectiveConfig(prediction="x0", loss_weighting="min_snr", min_snr_gamma=5.0)
    np.testing.assert_allclose(loss_weight(a, sg, cfg_x0), jnp.minimum(snr, 5.0), rtol=1e-5)
    assert np.all(np.isfinite(loss_weight(a, sg, cfg)))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="^prediction:"):
        DiffusionObjectiveConfig(schedule="flow", prediction="eps").validate()
    with pytest.raises(ConfigError, match="^prediction:"):
        DiffusionObjectiveConfig(schedule="cosine", prediction="flow").validate()
    with pytest.raises(ConfigError, match="^schedule:"):
        DiffusionObjectiveConfig(schedule="cosinus").validate()
    with pytest.raises(ConfigError, match="^sampling.steps:"):
        DiffusionObjectiveConfig(sampling=SamplerConfig(steps=0)).validate()
