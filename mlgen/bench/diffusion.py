"""``mlgen bench diffusion``: the diffusion train step through mlgen's own path, on the peer's shapes.

Defaults match ``shared/peers/unet_train.py`` (diffusers ``UNet2DModel`` + DDPM): 16x16x1
images, channels (64, 128), 2 residual blocks per level, self-attention at 8x8 (head size
8), batch 64, eps prediction on the cosine schedule, AdamW, float32. The step is the real
one: config -> diffusion task -> sharded init -> ``make_train_step`` -> jit with donation.
Prints one JSON line with ``images_per_s``.

Measured side by side on an idle 2-core CPU (2026-11-23, two alternations): diffusers 66-67
images/s; mlgen 37-38 (0.56x), 46 with ``mlgen --cpu-devices 2`` (0.69x); the target is
1.3x. The step does 129 GFLOP (XLA cost analysis), so mlgen runs at ~70 GFLOP/s against
diffusers' ~135. A lone 3x3 convolution's forward+backward runs at 140-240 GFLOP/s in XLA
here, so the loss is elsewhere. Ablations (ms/step, one device, ±100): the full step 1824,
without the six attention blocks 1431, without GroupNorm 1604; head size 32 instead of 8
1698; ``--conv-impl im2col`` is slower (2.08 s). XLA CPU flags tried without effect:
ynn/onednn fusion types, the concurrency-optimized scheduler.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np

from mlgen.bench import time_train_step


def run(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="mlgen bench diffusion")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--channels", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--layers-per-block", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--model", choices=["unet", "dit"], default="unet")
    ap.add_argument("--conv-impl", default="auto", choices=["auto", "xla", "im2col"])
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype; parameters and optimizer state stay float32")
    a = ap.parse_args(argv)

    from mlgen.config import Config, MeshConfig, OptimConfig, TrainConfig
    from mlgen.data.images import ImageDataConfig
    from mlgen.models.dit import PRESETS as DIT
    from mlgen.models.unet import UNetConfig
    from mlgen.objectives.diffusion import DiffusionObjectiveConfig

    if a.model == "unet":
        model = UNetConfig(image_size=a.size, in_channels=1, channels=tuple(a.channels),
                           blocks_per_level=a.layers_per_block, attention_levels=(len(a.channels) - 1,),
                           head_dim=8, num_groups=32, conv_impl=a.conv_impl, attention_backend=a.attention_backend,
                           dtype=a.dtype)
    else:
        model = dataclasses.replace(DIT["dit-digits"], image_size=a.size, num_classes=0,
                                    attention_backend=a.attention_backend, dtype=a.dtype)
    cfg = Config(
        task="diffusion", workdir="/tmp/mlgen-bench-diffusion",
        model=model,
        data=ImageDataConfig(source="digits", image_size=a.size, batch_size=a.batch),
        objective=DiffusionObjectiveConfig(schedule="cosine", prediction="eps", label_dropout=0.0),
        mesh=MeshConfig(data=-1, rules="dp"),
        optim=OptimConfig(lr=1e-4, b2=0.999, weight_decay=0.01, clip_norm=0.0, warmup_steps=0, schedule="constant"),
        train=TrainConfig(num_steps=a.steps + a.warmup),
    )
    rng = np.random.default_rng(0)
    host = {"images": rng.standard_normal((a.batch, a.size, a.size, 1)).astype(np.float32),
            "labels": np.zeros((a.batch,), np.int32)}
    med, n_params = time_train_step(cfg, host, steps=a.steps, warmup=a.warmup)
    print(json.dumps({"bench": "mlgen-diffusion", "model": a.model, "conv_impl": a.conv_impl, "dtype": a.dtype,
                      "images_per_s": a.batch / med, "step_s": med, "params": n_params,
                      "devices": len(jax.devices())}))
