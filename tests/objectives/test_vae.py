"""The VAE objective: reconstruction error falls over a few steps, KL is finite, the terms add."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mlgen.config import ConfigError
from mlgen.data.images import ImageDataConfig, load_arrays
from mlgen.models.vae import PRESETS, VAE, kl_divergence
from mlgen.objectives.vae import VAEObjectiveConfig, make_loss

TINY = PRESETS["vae-tiny"]


@pytest.fixture(scope="module")
def digits():
    images, _ = load_arrays(ImageDataConfig(image_size=8), "train")
    return jnp.asarray(images[:32])


def _model():
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(VAE(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


@pytest.mark.parametrize("reconstruction", ["l1", "l2"])
def test_reconstruction_error_falls_and_kl_is_finite(digits, reconstruction):
    graphdef, params = _model()
    cfg = VAEObjectiveConfig(reconstruction=reconstruction, kl_weight=1e-3)
    loss_fn = make_loss(graphdef, cfg)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        (loss, (metrics, _)), g = jax.value_and_grad(loss_fn, has_aux=True)(
            params, {}, {"images": digits}, key
        )
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, metrics

    recs, kls = [], []
    for i in range(12):
        params, opt, m = step(params, opt, jax.random.key(i))
        recs.append(float(m["rec"]))
        kls.append(float(m["kl"]))
    assert np.all(np.isfinite(kls)) and min(kls) >= 0
    assert np.mean(recs[-3:]) < 0.7 * np.mean(recs[:3]), recs


def test_loss_is_rec_plus_beta_kl_of_the_mean_in_evaluation(digits):
    graphdef, params = _model()
    model = nnx.merge(graphdef, params)
    mean, logvar = model.encode(digits)
    x_hat = model.decode(mean)
    for rec_kind, err in (("l1", jnp.abs), ("l2", jnp.square)):
        cfg = VAEObjectiveConfig(reconstruction=rec_kind, kl_weight=0.25)
        loss, (m, _) = make_loss(graphdef, cfg, train=False)(
            params, {}, {"images": digits}, jax.random.key(0)
        )
        rec = jnp.mean(err(x_hat - digits))
        kl = jnp.mean(kl_divergence(mean, logvar))
        assert float(m["rec"]) == pytest.approx(float(rec), rel=1e-4)
        assert float(m["kl"]) == pytest.approx(float(kl), rel=1e-4)
        assert float(loss) == pytest.approx(float(rec + 0.25 * kl), rel=1e-4)


def test_training_samples_the_posterior_unless_told_not_to(digits):
    graphdef, params = _model()
    batch = {"images": digits}
    sampled = make_loss(graphdef, VAEObjectiveConfig())
    a = sampled(params, {}, batch, jax.random.key(0))[0]
    b = sampled(params, {}, batch, jax.random.key(1))[0]
    assert float(a) != float(b)
    mean_only = make_loss(graphdef, VAEObjectiveConfig(sample_posterior=False))
    c = mean_only(params, {}, batch, jax.random.key(0))[0]
    d = mean_only(params, {}, batch, jax.random.key(1))[0]
    assert float(c) == float(d)


@pytest.mark.parametrize(
    "change, field",
    [(dict(reconstruction="l3"), "reconstruction"), (dict(kl_weight=-1.0), "kl_weight")],
)
def test_bad_objective_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        dataclasses.replace(VAEObjectiveConfig(), **change).validate()
