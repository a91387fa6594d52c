"""A plain optax loop over an objective's loss, for the encoder objectives' tests."""

import jax
import optax
from flax import nnx


def train(model, make_loss, batches, *, lr=3e-3, seed=0):
    """Trains ``model`` on ``batches`` with Adam; returns ``(graphdef, params, losses)``."""
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    loss_fn = make_loss(graphdef)
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, rng):
        (value, (metrics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, {}, batch, rng
        )
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    losses = []
    for i, batch in enumerate(batches):
        params, opt, value = step(params, opt, batch, jax.random.key(seed + i))
        losses.append(float(value))
    return graphdef, params, losses
