"""The KL-autoencoder objective: reconstruction + beta * KL (Kingma & Welling; Stable Diffusion's
first stage without its perceptual and adversarial terms).

``loss = rec + kl_weight * kl`` where

- ``rec`` is the mean per-pixel reconstruction error, L1 (``|x - x_hat|``) or L2
  (``(x - x_hat) ** 2``), of the decoder's output for ``z`` drawn from the posterior
  (training; its mean when ``sample_posterior=False`` and always in evaluation);
- ``kl`` is ``KL(q(z | x) || N(0, I))`` per latent element, averaged over the batch and the
  latent's positions and channels. Both are means, so ``kl_weight`` keeps its meaning across
  image and latent sizes (Stable Diffusion's ``kl_weight=1e-6`` weighs sums over pixels and
  latent elements, beside perceptual and adversarial terms: not the same scale).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.config import check, register
from mlgen.models.vae import kl_divergence, sample_posterior
from mlgen.objectives import bind, state_after

__all__ = ["RECONSTRUCTIONS", "VAEObjectiveConfig", "make_loss"]

RECONSTRUCTIONS = ("l1", "l2")


@register("vae_kl")  # "vae" names the model family's config
@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEObjectiveConfig:
    """Reconstruction + beta * KL.

    Attributes:
      reconstruction: ``l1`` | ``l2``: the per-pixel error.
      kl_weight: beta, on the KL per latent element (0 = a plain autoencoder).
      sample_posterior: decode a sample of the posterior in training (the VAE); False = its
        mean (the KL term still regularises the means).
    """

    reconstruction: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-3
    sample_posterior: bool = True

    def validate(self) -> None:
        check(
            self.reconstruction in RECONSTRUCTIONS,
            "reconstruction",
            f"must be one of {list(RECONSTRUCTIONS)}, got {self.reconstruction!r}",
        )
        check(self.kl_weight >= 0, "kl_weight", f"must be >= 0, got {self.kl_weight}")


def make_loss(graphdef: nnx.GraphDef, cfg: VAEObjectiveConfig, *, train: bool = True):
    """Returns ``loss(params, model_state, batch, rng) -> (loss, (metrics, model_state))`` for a
    model of kind ``autoencoder`` (``encode`` / ``decode``).

    ``batch``: ``images`` float ``[B, H, W, C]`` in [-1, 1]. ``rng`` draws the posterior
    sample and, when ``train``, dropout. Metrics: ``rec`` (the configured error), ``kl`` (per
    latent element), ``mse`` (per pixel, whichever ``rec`` is) and ``latent_std`` (of the
    posterior means: what latent diffusion's scale factor will divide by).
    """
    cfg.validate()

    def loss(params, model_state, batch, rng):
        model = bind(graphdef, params, model_state)
        x = batch["images"].astype(jnp.float32)
        k_enc, k_z, k_dec = jax.random.split(rng, 3)
        mean, logvar = model.encode(x, rng=k_enc if train else None)
        z = sample_posterior(k_z, mean, logvar) if train and cfg.sample_posterior else mean
        x_hat = model.decode(z, rng=k_dec if train else None).astype(jnp.float32)
        err = x_hat - x
        rec = jnp.mean(jnp.abs(err) if cfg.reconstruction == "l1" else jnp.square(err))
        kl = jnp.mean(kl_divergence(mean, logvar))
        metrics = {
            "rec": rec,
            "kl": kl,
            "mse": jnp.mean(jnp.square(err)),
            "latent_std": jnp.std(mean),
        }
        return rec + cfg.kl_weight * kl, (metrics, state_after(model, model_state))

    return loss
