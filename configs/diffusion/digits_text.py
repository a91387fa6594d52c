"""Text-to-image UNet diffusion on scikit-learn's digits at their native 8x8 (bundled, no
download): the base model of the text-to-image cascade (``configs/diffusion/digits_sr.py``
upsamples its samples to 16x16, as Imagen's super-resolution stages do).

The digits UNet (channels 32/64) at 8x8 with text instead of class labels: a byte-level text
encoder it owns and trains jointly (2 layers, width 64, prompts of up to 24 bytes) feeds a
cross-attention block after every self-attention block (at 8x8 and 4x4; context width 64) and,
pooled, the time embedding. Each training digit gets a caption drawn at random per example and
epoch from ten templates ("a handwritten seven", "the digit 7", "number seven", "7", ...);
validation and `mlgen eval` prompt with four held-out templates ("a drawing of a seven", "the
numeral 7", ...). 10% of the captions are dropped to the empty prompt, which the model maps to
a learned null embedding (classifier-free guidance).

    mlgen --cpu-devices 2 train configs/diffusion/digits_text.py workdir=/tmp/digits-text
    mlgen sample /tmp/digits-text --prompt "a handwritten seven" --prompt "the digit 3" --out x.png
    mlgen eval /tmp/digits-text
    # the cascade: 8x8 from the prompt, then the upsampler to 16x16
    mlgen --cpu-devices 2 train configs/diffusion/digits_sr.py workdir=/tmp/digits-sr
    mlgen sample /tmp/digits-sr --base /tmp/digits-text --prompt "a handwritten seven" --out y.png
    mlgen eval /tmp/digits-sr --base /tmp/digits-text

MEASURED
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
        image_size=8,
        attention_levels=(0, 1),
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
        data=ImageDataConfig(source="digits", image_size=8, batch_size=64),
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
            num_steps=2000,
            log_every=100,
            eval_every=500,
            eval_steps=3,
            checkpoint_every=500,
            ema_decay=0.999,
            ema_warmup=1000,
        ),
    )
