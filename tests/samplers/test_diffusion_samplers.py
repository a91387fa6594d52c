"""Samplers with the exact denoiser of Gaussian data (DPM-Solver++ against DDIM too); CFG limits;
guidance rescale; no recompiles for steps / guidance; the sampler options of the CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgen.cli.sample import _sampler_overrides, sample_main
from mlgen.config import ConfigError, InputError, override
from mlgen.models.dit import PRESETS as DIT
from mlgen.models.dit import DiT
from mlgen.models.unet import PRESETS, UNet
from mlgen.objectives import schedules
from mlgen.objectives.diffusion import SamplerConfig, from_x0_eps
from mlgen.samplers import diffusion as sd

D = 3
MU = np.array([0.5, -0.3, 0.1], np.float32)
A = np.array([[0.6, 0.0, 0.0], [0.3, 0.4, 0.0], [-0.2, 0.1, 0.3]], np.float32)
COV = A @ A.T


def gaussian_denoiser(schedule, prediction):
    """The exact model for x0 ~ N(MU, COV): E[x0 | x_t], returned in ``prediction`` space."""
    mu, cov = jnp.asarray(MU), jnp.asarray(COV)

    def denoise(x, mt, labels, cond):
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
    ("cosine", "eps", "dpmpp_2m", 20),
    ("linear", "v", "dpmpp_2m", 30),
    ("flow", "flow", "dpmpp_2m", 20),
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


def _toy_conditional(x, mt, labels, cond=None):
    """A label-dependent fake 'eps' model: cond and uncond outputs differ."""
    shift = jnp.where(labels == 10, 0.0, 0.1 * (labels.astype(jnp.float32) + 1.0))
    return 0.9 * x + shift[:, None, None, None] + 1e-4 * mt[:, None, None, None]


def _exact_start(schedule, n, key):
    """``n`` draws of the exact marginal at t = 1, ``N(a MU, a^2 COV + s^2 I)``, whitened so that
    their sample mean and covariance are exactly that: the samplers are affine maps for Gaussian
    data, so the moments of their outputs carry no Monte Carlo error, only the solver's."""
    z = np.asarray(jax.random.normal(key, (n, D)), np.float64)
    z -= z.mean(0)
    z = np.linalg.solve(np.linalg.cholesky(np.cov(z.T)), z.T).T
    a, s = float(schedule.alpha(1.0)), float(schedule.sigma(1.0))
    x = a * MU + z @ np.linalg.cholesky(a * a * COV + s * s * np.eye(D)).T
    return jnp.asarray(x, jnp.float32).reshape(n, 1, D, 1)


def _moment_error(x) -> float:
    x = np.asarray(x, np.float64).reshape(-1, D)
    return float(np.abs(x.mean(0) - MU).max() + np.abs(np.cov(x.T) - COV).max())


@pytest.mark.parametrize("schedule,prediction", [("cosine", "eps"), ("flow", "flow")])
def test_dpmpp_20_steps_beat_ddim_50(schedule, prediction):
    """DPM-Solver++(2M) is second order: 20 steps reach (at least) DDIM's error at 50."""
    s = schedules.make(schedule)
    x_T = _exact_start(s, 256, jax.random.key(1))

    def run(sampler):
        return jax.jit(
            lambda steps: sd.sample_fn(
                gaussian_denoiser(s, prediction),
                s,
                prediction=prediction,
                sampler=sampler,
                x_T=x_T,
                key=jax.random.key(2),
                steps=steps,
                clip=False,
                max_steps=50,
            )
        )

    dpm, ddim = run("dpmpp_2m"), run("ddim")
    err = {
        ("dpmpp_2m", 10): _moment_error(dpm(10)),
        ("dpmpp_2m", 20): _moment_error(dpm(20)),
        ("ddim", 20): _moment_error(ddim(20)),
        ("ddim", 50): _moment_error(ddim(50)),
    }
    print(schedule, prediction, {f"{k[0]}@{k[1]}": f"{v:.2e}" for k, v in err.items()})
    assert err["dpmpp_2m", 20] <= err["ddim", 50], err
    assert err["dpmpp_2m", 10] < err["ddim", 20], err
    assert err["dpmpp_2m", 20] < err["dpmpp_2m", 10], err
    assert err["dpmpp_2m", 20] < 0.01, err


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp_2m"])
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
    cond_only = sd.sample_fn(lambda x, t, y, c: _toy_conditional(x, t, labels), s, **kw)
    uncond_only = sd.sample_fn(
        lambda x, t, y, c: _toy_conditional(x, t, jnp.full_like(labels, 10)), s, **kw
    )
    g1 = sd.sample_fn(_toy_conditional, s, labels=labels, guidance=1.0, **kw)
    g0 = sd.sample_fn(_toy_conditional, s, labels=labels, guidance=0.0, **kw)
    g3 = sd.sample_fn(_toy_conditional, s, labels=labels, guidance=3.0, **kw)
    np.testing.assert_allclose(g1, cond_only, atol=1e-5)
    np.testing.assert_allclose(g0, uncond_only, atol=1e-5)
    assert not np.allclose(g3, g1, atol=1e-3)


def _toy_context(x, mt, labels, cond):
    """A denoiser conditioned on ``ctx`` [B, 3] (guidance's null: zeros) and ``keep`` [B]
    (never dropped: a super-resolution stage's low-resolution image plays this part)."""
    del labels
    s = jnp.sum(cond["ctx"], axis=1) + 2.0 * cond["keep"]
    return 0.7 * x + 0.01 * mt[:, None, None, None] * s[:, None, None, None]


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_guidance_with_extra_conditioning_inputs(sampler):
    """``cond`` reaches the denoiser; guidance's unconditional half sees ``null_cond``'s
    values for the inputs it names and the real values of the others."""
    s = schedules.make("cosine")
    x_T = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
    ctx = jnp.arange(12, dtype=jnp.float32).reshape(4, 3) / 10
    keep = jnp.array([1.0, -1.0, 0.5, 2.0])
    kw = dict(prediction="eps", sampler=sampler, x_T=x_T, key=jax.random.key(1), steps=6)
    kw.update(max_steps=8)
    cond = {"ctx": ctx, "keep": keep}
    null = {"ctx": 0.0}
    g1 = sd.sample_fn(_toy_context, s, cond=cond, null_cond=null, guidance=1.0, **kw)
    g0 = sd.sample_fn(_toy_context, s, cond=cond, null_cond=null, guidance=0.0, **kw)
    want1 = sd.sample_fn(lambda x, t, y, c: _toy_context(x, t, y, cond), s, **kw)
    uncond = {"ctx": jnp.zeros_like(ctx), "keep": keep}
    want0 = sd.sample_fn(lambda x, t, y, c: _toy_context(x, t, y, uncond), s, **kw)
    np.testing.assert_allclose(g1, want1, atol=1e-5)
    np.testing.assert_allclose(g0, want0, atol=1e-5)
    assert not np.allclose(want0, want1, atol=1e-3)
    # Without null_cond nothing is dropped: one conditional call whatever the scale.
    g3 = sd.sample_fn(_toy_context, s, cond=cond, guidance=3.0, **kw)
    np.testing.assert_allclose(g3, want1, atol=1e-5)


def test_guide_rescale_limits():
    """phi = 0 is plain guidance, phi = 1 has the conditional output's per-example std, phi in
    between blends the two; guidance 1 is the conditional output whatever phi."""
    k1, k2 = jax.random.split(jax.random.key(0))
    c = jax.random.normal(k1, (3, 4, 4, 2)) * jnp.array([0.5, 1.0, 2.0])[:, None, None, None]
    u = 0.3 * jax.random.normal(k2, (3, 4, 4, 2)) + 0.2
    plain = np.asarray(u + 4.0 * (c - u))
    np.testing.assert_allclose(sd.guide(c, u, 4.0, 0.0), plain, rtol=1e-6, atol=1e-6)
    full = np.asarray(sd.guide(c, u, 4.0, 1.0))
    std = lambda a: np.asarray(a).reshape(3, -1).std(axis=1)  # noqa: E731
    np.testing.assert_allclose(std(full), std(c), rtol=1e-5)
    assert not np.allclose(std(plain), std(c), rtol=0.1)
    ratio = (std(c) / std(plain))[:, None, None, None]
    np.testing.assert_allclose(full, plain * ratio, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        sd.guide(c, u, 4.0, 0.3), 0.3 * full + 0.7 * plain, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(sd.guide(c, u, 1.0, 0.7), c, rtol=1e-6, atol=1e-6)


def _toy_gain(x, mt, labels, cond=None):
    """A fake 'eps' model whose condition changes the output's std (so rescale matters)."""
    gain = jnp.where(labels == 10, 0.6, 0.9 + 0.05 * labels.astype(jnp.float32))
    return gain[:, None, None, None] * x + _toy_conditional(x, mt, labels) - 0.9 * x


@pytest.mark.parametrize("sampler,phi", [("ddim", 0.0), ("dpmpp_2m", 1.0)])
def test_guidance_rescale_in_the_sampler(sampler, phi):
    """The samplers guide with rescale as if the model were the (rescaled) guided one."""
    s = schedules.make("cosine")
    x_T = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
    labels = jnp.array([0, 3, 5, 9])
    w = 3.0
    kw = dict(prediction="eps", sampler=sampler, x_T=x_T, key=jax.random.key(1), steps=8)
    kw.update(null_label=10, max_steps=8, clip=False)

    def guided_model(x, t, y, cond):  # written out here, independently of sd.guide
        c = _toy_gain(x, t, labels)
        u = _toy_gain(x, t, jnp.full_like(labels, 10))
        g = u + w * (c - u)
        std_c, std_g = (jnp.std(a, axis=(1, 2, 3), keepdims=True) for a in (c, g))
        return phi * g * std_c / std_g + (1 - phi) * g

    want = sd.sample_fn(guided_model, s, **kw)
    got = sd.sample_fn(_toy_gain, s, labels=labels, guidance=w, guidance_rescale=phi, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    other = sd.sample_fn(_toy_gain, s, labels=labels, guidance=w, guidance_rescale=1.0 - phi, **kw)
    assert not np.allclose(other, want, atol=1e-3)


def test_sampler_options_errors(tmp_path):
    """Bad sampler options: one-line errors naming the flag / field, before any run is read."""
    base = [str(tmp_path / "no-run"), "--out", str(tmp_path / "g.png")]
    with pytest.raises(InputError, match=r"argument --sampler: invalid choice: 'dpm'"):
        sample_main([*base, "--sampler", "dpm"])
    with pytest.raises(InputError, match=r"argument --guidance-rescale: invalid float value"):
        sample_main([*base, "--guidance-rescale", "high"])
    scfg = SamplerConfig()
    for bad in (1.5, -0.1):
        with pytest.raises(
            InputError, match=rf"^--guidance-rescale: must be in \[0, 1\], got {bad}$"
        ):
            _sampler_overrides(scfg, guidance_rescale=bad)
    assert _sampler_overrides(scfg, sampler="dpmpp_2m", guidance_rescale=0.7, eta=None) == {
        "sampler": "dpmpp_2m",
        "guidance_rescale": 0.7,
    }
    # the config spelling: objective.sampling.sampler=dpmpp_2m, ...guidance_rescale=0.7
    cfg = override(override(scfg, "sampler", "dpmpp_2m"), "guidance_rescale", "0.7")
    assert (cfg.sampler, cfg.guidance_rescale) == ("dpmpp_2m", 0.7)
    cfg.validate()
    with pytest.raises(ConfigError, match=r"^guidance_rescale: must be in \[0, 1\], got 2.0$"):
        SamplerConfig(guidance_rescale=2.0).validate()
    with pytest.raises(ConfigError, match=r"^sampler: 'dpmpp' is not one of"):
        override(scfg, "sampler", "dpmpp")
    with pytest.raises(ValueError, match=r"unknown sampler 'dpmpp'"):
        sd.sample_fn(
            lambda x, t, y, c: x,
            schedules.make("cosine"),
            prediction="eps",
            sampler="dpmpp",
            x_T=jnp.zeros((1, 1)),
            key=jax.random.key(0),
            steps=1,
        )


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
    c = sd.sample(
        graphdef,
        params,
        key=jax.random.key(1),
        steps=3,
        guidance=0.5,
        guidance_rescale=0.7,
        eta=0.5,
        **kw,
    )
    assert sd.TRACE_COUNT["sample"] - before == 1
    assert a.shape == b.shape == c.shape == (3, 8, 8, 1)
    assert np.all(np.isfinite(np.asarray(b)))
