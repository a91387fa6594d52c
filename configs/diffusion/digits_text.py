"""Text-to-image UNet diffusion on scikit-learn's digits (16x16, bundled, no download).

The class-conditional digits UNet (channels 32/64, attention at 8x8) with text instead of class
labels: a byte-level text encoder it owns and trains jointly (2 layers, width 64, prompts of up
to 24 bytes) feeds a cross-attention block after every self-attention block (context width 64)
and, pooled, the time embedding. Each training digit gets a caption drawn at random per example
and epoch from ten templates ("a handwritten seven", "the digit 7", "number seven", "7", ...);
validation and `mlgen eval` prompt with four held-out templates ("a drawing of a seven", "the
numeral 7", ...). 10% of the captions are dropped to the empty prompt, which the model maps to
a learned null embedding (classifier-free guidance).

    mlgen --cpu-devices 2 train configs/diffusion/digits_text.py workdir=/tmp/digits-text
    mlgen sample /tmp/digits-text --prompt "a handwritten seven" --prompt "the digit 3" --out x.png
    mlgen eval /tmp/digits-text

Measured: see the numbers filled in below once the demo has run.
"""

import dataclasses

from mlgen.config import Config, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.images import ImageDataConfig
from mlgen.models.encoder import EncoderConfig
from mlgen.models.text import TextConfig
from mlgen.models.unet import PRESETS
from mlgen.objectives.diffusion import DiffusionObjectiveConfig, SamplerConfig


def get_config() -> Config:
    model = dataclasses.replace(
        PRESETS["unet-digits"],
        num_classes=0,
        context_dim=64,
        text=TextConfig(
            encoder=EncoderConfig(vocab_size=256, num_layers=2, d_model=64, num_heads=2),
            tokenizer="byte",
            max_len=24,
        ),
    )
    return Config(
        task="diffusion",
        workdir="/tmp/mlgen-digits-text",
        seed=0,
        model=model,
        data=ImageDataConfig(source="digits", image_size=16, batch_size=64),
        objective=DiffusionObjectiveConfig(
            schedule="cosine",
            prediction="v",
            loss_weighting="min_snr",
            min_snr_gamma=5.0,
            label_dropout=0.1,
            sampling=SamplerConfig(sampler="ddim", steps=50, guidance=2.0),
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
            num_steps=500,
            log_every=50,
            eval_every=250,
            eval_steps=3,
            checkpoint_every=250,
            ema_decay=0.995,
            ema_warmup=250,
        ),
    )
