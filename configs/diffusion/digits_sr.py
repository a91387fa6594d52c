"""Super-resolution diffusion on scikit-learn's digits, 8x8 -> 16x16: the second stage of the
digits cascades (base models: ``configs/diffusion/digits_text.py``, text-to-image, and
``configs/diffusion/digits_8.py``, class-conditional).

A UNet without classes (channels 32/64, no attention: upsampling is local; the low-res image
carries the class, so it follows any base: class-conditional or text-to-image) that sees the
noisy 16x16 image with the 8x8 low-res digit (the 16x16 image area-averaged to 8x8 by the data
pipeline) bilinearly upsampled and concatenated on channels. The low-res input is noise-
augmented by the diffusion schedule at a random level in [0, 0.5] while training (the level is
embedded and added to the time embedding) and at the fixed level ``sample_aug`` when sampling.
Cosine schedule, v prediction, min-SNR-5, EMA. Sample grids every 500 steps show held-out
triples low-res | output | real.

    mlgen --cpu-devices 2 train configs/diffusion/digits_text.py workdir=/tmp/digits-text
    mlgen --cpu-devices 2 train configs/diffusion/digits_sr.py workdir=/tmp/digits-sr
    mlgen sample /tmp/digits-sr --base /tmp/digits-text --prompt "a handwritten seven" --out y.png
    mlgen eval /tmp/digits-sr --base /tmp/digits-text  # the text cascade's 16x16 samples
    mlgen eval /tmp/digits-sr --base /tmp/digits-8     # or the class-conditional base's
    mlgen eval /tmp/digits-sr                          # fed held-out real 8x8 digits

Measured on a 2-core CPU (2026-12-02, near idle: only `mlgen eval` and `mlgen sample` of
other runs had finished before): 1000 steps in 6m32s wall (0.30 s/step, 606 s user CPU);
loss 0.0144, eval loss 0.0137 at step 1000.

``mlgen eval /tmp/digits-sr --base /tmp/digits-text`` (1000 samples: the text base DDIM-50,
guidance 2, prompted with the held-out caption templates; then the upsampler DDIM-50, guidance
1, aug level 0.1; 4m16s): the cascade at 16x16: class accuracy of the prompted digits 0.912,
confidence 0.931 (real 0.936), Fréchet 3.13 against the floor 1.46. Naive upsampling of the same
8x8 base samples: bicubic 4.69, nearest 6.97 (accuracy 0.914 both). The base samples at 8x8:
accuracy 0.915, Fréchet 1.19 (floor 0.68). An earlier class-conditional upsampler (step 500 of
an unfinished run, fed digits_8.py's samples) scored 2.97 (bicubic 4.54).
``mlgen eval /tmp/digits-sr`` (the upsampler fed 1000 held-out real 8x8 digits, 2m37s):
Fréchet 0.37, accuracy 0.992 (bicubic: Fréchet 0.94, accuracy 0.996; nearest: 0.68, 1.000);
below the floor because the outputs are upsampled from the very held-out images the score
compares them with.
Grids: WORKDIR/samples/step_001000.png (held-out triples low-res | output | real); the cascade:
``mlgen sample /tmp/digits-sr --base /tmp/digits-text --out cascade.png`` (a row per digit).
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
            num_classes=0,  # the low-res image carries the class: it follows any base
        ),
        data=ImageDataConfig(source="digits", image_size=16, low_res_size=8, batch_size=64),
        objective=SuperResObjectiveConfig(
            schedule="cosine",
            prediction="v",
            loss_weighting="min_snr",
            min_snr_gamma=5.0,
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
