"""Class-conditional UNet diffusion on scikit-learn's digits (16x16, bundled, no download).

An ADM-style UNet (channels 32/64, attention at 8x8, ~0.76M parameters) with the cosine
schedule, v prediction, min-SNR-5 weighting and 10% label dropout for classifier-free
guidance; EMA of the parameters; DDIM sample grids (guidance 2) every 500 steps.

    mlgen train configs/diffusion/digits_unet.py workdir=/tmp/digits-unet
    mlgen sample /tmp/digits-unet --out /tmp/digits-unet/grid.png
    mlgen eval /tmp/digits-unet

Measured (2-core CPU shared with other jobs, load 5-12): 0.6-1.6 s/step, so 2000 steps took
~35 min wall here (it needs ~0.3 s/step on an idle machine for 10 min). At step 2000, `mlgen
eval` (1000 DDIM-50 samples, guidance 2): confidence 0.985 (real held-out 0.951), class
accuracy 1.000, Fréchet 2.71 against a real-vs-real floor of 1.46. Digits are legible from
step ~500 (WORKDIR/samples/step_000500.png).
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
        objective=DiffusionObjectiveConfig(schedule="cosine", prediction="v", loss_weighting="min_snr",
                                           min_snr_gamma=5.0, label_dropout=0.1,
                                           sampling=SamplerConfig(sampler="ddim", steps=50, guidance=2.0)),
        mesh=MeshConfig(data=-1, rules="dp"),
        optim=OptimConfig(lr=2e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.05, b2=0.99,
                          weight_decay=0.0, clip_norm=1.0),
        train=TrainConfig(num_steps=2000, log_every=50, eval_every=500, eval_steps=3, checkpoint_every=500,
                          ema_decay=0.999, ema_warmup=1000),
    )
