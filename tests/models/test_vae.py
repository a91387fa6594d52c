"""The VAE family: latent shapes per downsampling factor, logical axes, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mlgen import config as config_lib
from mlgen import sharding
from mlgen.config import ConfigError
from mlgen.models.family import families, family_of
from mlgen.models.vae import PRESETS, VAE, VAEConfig, kl_divergence
from mlgen.nn.policy import Policy

TINY = PRESETS["vae-tiny"]


@pytest.mark.parametrize("channels", [(8,), (8, 16), (8, 16, 16), (8, 8, 16, 16)])
def test_latent_shape_follows_the_downsampling_factor(channels):
    cfg = dataclasses.replace(TINY, image_size=16, channels=channels, latent_channels=3)
    factor = 2 ** (len(channels) - 1)
    assert cfg.downsample == factor
    assert cfg.latent_shape == (16 // factor, 16 // factor, 3)
    x = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)

    def run(x):
        model = VAE(cfg, rngs=nnx.Rngs(0))
        mean, logvar = model.encode(x)
        return mean, logvar, model.decode(mean), model(x, rng=jax.random.key(0))

    mean, logvar, out, (rec, m2, _) = jax.eval_shape(run, x)
    assert mean.shape == logvar.shape == (2, *cfg.latent_shape)
    assert out.shape == rec.shape == (2, 16, 16, 1) and m2.shape == mean.shape


def test_forward_is_finite_and_sampling_needs_a_key():
    with nnx.use_eager_sharding(False):
        model = VAE(TINY, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1), minval=-1, maxval=1)
    rec0, mean, logvar = model(x)
    rec1, *_ = model(x, rng=jax.random.key(2))
    assert bool(jnp.all(jnp.isfinite(rec0))) and bool(jnp.all(jnp.isfinite(logvar)))
    assert jnp.allclose(rec0, model.decode(mean))  # no key: the posterior mean is decoded
    assert not jnp.allclose(rec0, rec1)  # a key: a posterior sample


def test_kl_divergence_matches_the_closed_form():
    mean, logvar = jnp.array([0.0, 1.0, -2.0]), jnp.array([0.0, jnp.log(4.0), 0.5])
    want = 0.5 * (mean**2 + jnp.exp(logvar) - 1 - logvar)
    assert jnp.allclose(kl_divergence(mean, logvar), want)
    assert float(kl_divergence(jnp.zeros(()), jnp.zeros(()))) == 0.0
    assert float(kl_divergence(jnp.array(1.0), jnp.log(jnp.array(4.0)))) == pytest.approx(
        0.5 * (1 + 4 - 1 - float(jnp.log(4.0)))
    )


def test_family_is_registered_and_its_parameters_carry_its_logical_axes():
    family = families()["vae"]
    assert family_of(TINY) is family and family.kind == "autoencoder"
    assert config_lib.section_name(VAEConfig) == "vae"
    used = set()
    model = nnx.eval_shape(lambda: family.build(TINY, nnx.Rngs(0), Policy()))
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = v.get_metadata()["out_sharding"]
        assert names is not None and len(names) == v.ndim
        used |= {n for n in names if n is not None}
    with sharding.recording() as names:
        jax.eval_shape(lambda: family.build(TINY, nnx.Rngs(0), Policy())(jnp.zeros((2, 8, 8, 1))))
    used |= names
    assert used == set(family.logical_axes)
    assert set(family.logical_axes) <= sharding.axes()


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(image_size=10, channels=(8, 16, 16)), "image_size"),  # factor 4 does not divide 10
        (dict(image_size=6, channels=(8, 16, 16, 16)), "image_size"),
        (dict(latent_channels=0), "latent_channels"),
        (dict(latent_channels=-2), "latent_channels"),
        (dict(channels=(8, 10)), "channels"),  # not a multiple of num_groups=4
        (dict(channels=()), "channels"),
        (dict(blocks_per_level=0), "blocks_per_level"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(change, field):
    with pytest.raises(ConfigError, match=rf"^{field}: ") as e:
        dataclasses.replace(TINY, **change).validate()
    assert "\n" not in str(e.value)


def test_bad_model_field_in_a_run_config_is_named_from_the_model_section():
    with pytest.raises(ConfigError, match=r"^model\.image_size: 18 is not divisible by .* 4"):
        config_lib.load(
            "configs/vae/digits_vae.py",
            ["workdir=/tmp/x", "model.channels=(32,64,64)", "model.image_size=18"],
        )
    with pytest.raises(ConfigError, match=r"^model\.latent_channels: must be > 0, got 0"):
        config_lib.load("configs/vae/digits_vae.py", ["workdir=/tmp/x", "model.latent_channels=0"])
