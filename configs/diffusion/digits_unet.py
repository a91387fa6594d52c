"""Class-conditional UNet diffusion on scikit-learn's digits (16x16, bundled, no download).

An ADM-style UNet (channels 32/64, attention at 8x8, ~0.76M parameters) with the cosine
schedule, v prediction, min-SNR-5 weighting and 10% label dropout for classifier-free
guidance; EMA of the parameters; DDIM sample grids (guidance 2) every 500 steps.

    mlgen --cpu-devices 2 train configs/diffusion/digits_unet.py workdir=/tmp/digits-unet
    mlgen sample /tmp/digits-unet --out /tmp/digits-unet/grid.png
    mlgen eval /tmp/digits-unet

`--cpu-devices 2` splits the host into two XLA CPU devices and the batch over them (data
parallel): on 2 cores a step takes 0.29 s instead of 0.40 s on one device, because XLA's
per-op threading leaves a core idle during the many small ops of a small UNet.

Measured on an idle 2-core CPU: 1500 steps in 8m34s wall (0.29 s/step); eval loss 0.0184.
`mlgen eval` (1000 DDIM-50 samples, guidance 2, 2 min): classifier confidence 0.940 (real
held-out digits 0.936), class accuracy 0.998, Fréchet 2.76 against a real-vs-real floor of
1.46. Digits are legible from step ~500 (WORKDIR/samples/step_000500.png). With
train.num_steps=2000 on one device (15m24s): Fréchet 2.71.
"""

from mlgen.config import Config, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.images import ImageDataConfig
from mlgen.models.unet import PRESETS
from mlgen.objectives.diffusion import DiffusionObjectiveConfig, SamplerConfig


def get_config() -> Config:
    return Config(
        task="diffusion",
        workdir="/tmp/mlgen-digits-unet",
        seed=0,
        model=PRESETS["unet-digits"],
        data=ImageDataConfig(source="digits", image_size=16, batch_size=64),
        objective=DiffusionObjectiveConfig(
            schedule="cosine",
            prediction="v",
            loss_weighting="min_snr",
            min_snr_gamma=5.0,
            label_dropout=0.1,
            sampling=SamplerConfig(sampler="ddim", steps=50, guidance=2.0),
        ),
        mesh=MeshConfig(data=-1),  # rules="auto": here pure data parallel
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
            num_steps=1500,
            log_every=50,
            eval_every=500,
            eval_steps=3,
            checkpoint_every=500,
            ema_decay=0.999,
            ema_warmup=1000,
        ),
    )
