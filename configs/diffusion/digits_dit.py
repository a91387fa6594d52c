"""Class-conditional DiT on scikit-learn's digits (16x16, patch 2, bundled, no download).

A DiT (4 adaLN-Zero blocks, width 128, 4 heads, 64 tokens of 2x2 patches, ~1.3M parameters)
trained with rectified flow (velocity prediction) and 10% label dropout; EMA of the
parameters; Euler sample grids with guidance 2 every 500 steps.

    mlgen train configs/diffusion/digits_dit.py workdir=/tmp/digits-dit
    mlgen sample /tmp/digits-dit --sampler heun --steps 25 --out /tmp/digits-dit/grid.png
    mlgen eval /tmp/digits-dit

The blocks run unrolled (``scan_layers=False``; the parameters stay stacked, so checkpoints
are the same either way): 0.29 s/step instead of 0.40 s with the layer scan on this CPU. One
CPU device is faster here than ``--cpu-devices 2`` (0.29 vs 0.54 s/step, unlike the UNet).

Measured on an idle 2-core CPU: 1700 steps in 9m33s wall (0.30 s/step); eval loss 0.139.
`mlgen eval` (1000 samples, guidance 2, ~2 min): Euler-50 gives classifier confidence 0.938
(real held-out digits 0.936), class accuracy 1.000, Fréchet 4.07 against a real-vs-real floor
of 1.46; Heun-25 gives Fréchet 3.96. Digits are legible from step ~500.
"""

import dataclasses

from mlgen.config import Config, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.images import ImageDataConfig
from mlgen.models.dit import PRESETS
from mlgen.objectives.diffusion import DiffusionObjectiveConfig, SamplerConfig


def get_config() -> Config:
    return Config(
        task="diffusion",
        workdir="/tmp/mlgen-digits-dit",
        seed=0,
        model=dataclasses.replace(
            PRESETS["dit-digits"], scan_layers=False
        ),  # unrolled: faster on CPU
        data=ImageDataConfig(source="digits", image_size=16, batch_size=64),
        objective=DiffusionObjectiveConfig(
            schedule="flow",
            prediction="flow",
            label_dropout=0.1,
            sampling=SamplerConfig(sampler="euler", steps=50, guidance=2.0),
        ),
        mesh=MeshConfig(data=-1),  # rules="auto": here pure data parallel
        optim=OptimConfig(
            lr=1e-3,
            warmup_steps=200,
            schedule="cosine",
            min_lr_ratio=0.05,
            b2=0.99,
            weight_decay=0.0,
            clip_norm=1.0,
        ),
        train=TrainConfig(
            num_steps=1700,
            log_every=50,
            eval_every=500,
            eval_steps=3,
            checkpoint_every=500,
            ema_decay=0.999,
            ema_warmup=1000,
        ),
    )
