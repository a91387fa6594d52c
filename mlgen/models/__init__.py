"""Model families: one module each, ending with its registered ``Family`` spec.

``transformer`` (decoder-only LM, kind ``decoder``), ``unet`` and ``dit`` (image denoisers,
kind ``denoiser``), ``vae`` (the KL autoencoder of latent diffusion, kind ``autoencoder``), and in
``encoder``: ``encoder`` (bidirectional, kind ``encoder``) and ``encoder_decoder`` (T5-style,
kind ``seq2seq``). Importing this package registers them; a new family is one more module that
calls ``mlgen.models.family.register``.
"""

from mlgen.models import dit, encoder, transformer, unet, vae
from mlgen.models.family import Family, families, family_of, register

__all__ = [
    "Family",
    "dit",
    "encoder",
    "families",
    "family_of",
    "register",
    "transformer",
    "unet",
    "vae",
]
