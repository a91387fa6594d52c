"""Super-resolution diffusion on scikit-learn's digits, 8x8 -> 16x16: the second stage of the
digits cascade (base model: ``configs/diffusion/digits_8.py``).

A class-conditional UNet (channels 32/64, no attention: upsampling is local) that sees the noisy
16x16 image with the 8x8 low-res digit (the 16x16 image area-averaged to 8x8 by the data
pipeline) bilinearly upsampled and concatenated on channels. The low-res input is noise-
augmented by the diffusion schedule at a random level in [0, 0.5] while training (the level is
embedded and added to the time embedding) and at the fixed level ``sample_aug`` when sampling.
Cosine schedule, v prediction, min-SNR-5, 10% label dropout (the low-res image is never
dropped), EMA. Sample grids every 500 steps show held-out triples low-res | output | real.

    mlgen --cpu-devices 2 train configs/diffusion/digits_8.py workdir=/tmp/digits-8
    mlgen --cpu-devices 2 train configs/diffusion/digits_sr.py workdir=/tmp/digits-sr
    mlgen sample /tmp/digits-sr --base /tmp/digits-8 --out /tmp/digits-sr/cascade.png
    mlgen eval /tmp/digits-sr --base /tmp/digits-8     # the cascade's 16x16 samples
    mlgen eval /tmp/digits-sr                          # fed held-out real 8x8 digits

MEASURED
"""

import dataclasses

from mlgen.config import Config, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.images import ImageDataConfig
from mlgen.models.unet import PRESETS
from mlgen.objectives.diffusion import SamplerConfig
from mlgen.objectives.superres import SuperResObjectiveConfig


def get_config() -> Config:
    return Config(
        task="superres",
        workdir="/tmp/mlgen-digits-sr",
        seed=0,
        model=dataclasses.replace(
            PRESETS["unet-digits"],
            attention_levels=(),
            mid_attention=False,
            low_res_channels=1,
            low_res_size=8,
            low_res_upsample="bilinear",
        ),
        data=ImageDataConfig(source="digits", image_size=16, low_res_size=8, batch_size=64),
        objective=SuperResObjectiveConfig(
            schedule="cosine",
            prediction="v",
            loss_weighting="min_snr",
            min_snr_gamma=5.0,
            label_dropout=0.1,
            aug_min=0.0,
            aug_max=0.5,
            sample_aug=0.1,
            sampling=SamplerConfig(sampler="ddim", steps=50, guidance=1.0),
        ),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(
            lr=2e-3,
            warmup_steps=100,
            schedule="cosine",
            min_lr_ratio=0.05,
            b2=0.99,
            weight_decay=0.0,
            clip_norm=1.0,
        ),
        train=TrainConfig(
            num_steps=1000,
            log_every=100,
            eval_every=500,
            eval_steps=3,
            checkpoint_every=500,
            ema_decay=0.999,
            ema_warmup=500,
        ),
    )
