"""``mlgen bench diffusion``: the diffusion train step through mlgen's own path,
on the peer's shapes.

Defaults (:data:`mlgen.bench.shapes.UNET_TRAIN`) match ``shared/peers/unet_train.py``
(diffusers ``UNet2DModel`` + DDPM): 16x16x1 images, channels (64, 128), 2 residual blocks
per level, self-attention at 8x8 (head size 8), batch 64, eps prediction on the cosine
schedule, AdamW, float32. The step is the real one: config -> diffusion task -> sharded init
-> ``make_train_step`` -> jit with donation. Prints one JSON line with ``images_per_s``.

Measured side by side on an idle 2-core CPU (2026-11-23, two alternations): diffusers 66-67
images/s; mlgen 37-38 (0.56x), 46 with ``mlgen --cpu-devices 2`` (0.69x); the target is
1.3x. Why 1.3x is out of reach in float32 on this CPU (2026-11-24):

- the step is 129 GFLOP by XLA's cost analysis and 139 GFLOP by torch's FlopCounterMode,
  so diffusers runs the whole step at ~140 GFLOP/s; 1.3x would need ~185 GFLOP/s sustained,
  GroupNorm, softmax and elementwise work included;
- the best any XLA op reaches here is a large float32 matmul at 170-188 GFLOP/s, while
  torch's oneDNN convolutions run forward+backward at 150-230 GFLOP/s (64x16x16x64 3x3:
  24 ms; XLA 30-33 ms with its default YNNPACK convolutions, 16-25 ms with Eigen's);
- per block, forward+backward: ResBlock 16x16 64->64 torch 45 ms, mlgen 94-120 ms (70 ms
  with ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot``); ResBlock 8x8 128->128
  41 vs 50 ms; attention block (16 heads of 8, T=64) 42 vs 60 ms, its attention op 21 vs
  38 ms (1024 batched 64x8x64 matmuls).

Tried without a worthwhile gain: im2col convolutions (slower: 2.08 s/step; in bfloat16 also
slower), Winograd F(2x2, 3x3) convolutions (2x slower: XLA:CPU's tile transforms cost more
than the saved multiplies), a hand-written attention backward (-12% on the op, ~2% on the
step), ``--dtype bfloat16`` (XLA's bf16 matmuls run at ~350 GFLOP/s, but the step is slower:
31 images/s), XLA CPU flags (ynn fusion types: +5-11% for ``dot``; onednn fusion; the
concurrency-optimized scheduler; ``--xla_cpu_multi_thread_eigen=false`` with 2 devices).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np

from mlgen.bench.shapes import UNET_TRAIN
from mlgen.bench.timing import time_train_step
from mlgen.config import Config, MeshConfig, OptimConfig, PrecisionConfig, TrainConfig
from mlgen.data.images import ImageDataConfig
from mlgen.models.dit import PRESETS as DIT
from mlgen.models.unet import UNetConfig
from mlgen.objectives.diffusion import DiffusionObjectiveConfig
from mlgen.ops.attention import AttentionConfig


def measure(argv: list[str]) -> dict:
    """Runs ``mlgen bench diffusion`` with these flags; returns what its JSON line holds."""
    ap = argparse.ArgumentParser(prog="mlgen bench diffusion")
    UNET_TRAIN.add_flags(ap)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--model", choices=["unet", "dit"], default="unet")
    ap.add_argument("--conv-impl", default="auto", choices=["auto", "xla", "im2col"])
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype; parameters and optimizer state stay float32",
    )
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="also trace --steps steps into DIR and print the step's op time by kind of op",
    )
    a = ap.parse_args(argv)

    if a.model == "unet":
        model = UNetConfig(
            image_size=a.size,
            in_channels=1,
            channels=tuple(a.channels),
            blocks_per_level=a.layers_per_block,
            attention_levels=(len(a.channels) - 1,),
            head_dim=8,
            num_groups=32,
            conv_impl=a.conv_impl,
            attention=AttentionConfig(backend=a.attention_backend),
        )
    else:
        model = dataclasses.replace(
            DIT["dit-digits"],
            image_size=a.size,
            num_classes=0,
            attention=AttentionConfig(backend=a.attention_backend),
        )
    cfg = Config(
        task="diffusion",
        workdir="/tmp/mlgen-bench-diffusion",
        model=model,
        data=ImageDataConfig(source="digits", image_size=a.size, batch_size=a.batch),
        objective=DiffusionObjectiveConfig(schedule="cosine", prediction="eps", label_dropout=0.0),
        mesh=MeshConfig(data=-1, rules="dp"),
        optim=OptimConfig(
            lr=1e-4, b2=0.999, weight_decay=0.01, clip_norm=0.0, warmup_steps=0, schedule="constant"
        ),
        train=TrainConfig(num_steps=a.steps + a.warmup),
        precision=PrecisionConfig(compute=a.dtype),
    )
    rng = np.random.default_rng(0)
    host = {
        "images": rng.standard_normal((a.batch, a.size, a.size, 1)).astype(np.float32),
        "labels": np.zeros((a.batch,), np.int32),
    }
    med, n_params = time_train_step(
        cfg, host, steps=a.steps, warmup=a.warmup, profile_dir=a.profile
    )
    return {
        "bench": "mlgen-diffusion",
        "model": a.model,
        "conv_impl": a.conv_impl,
        "dtype": a.dtype,
        "images_per_s": a.batch / med,
        "step_s": med,
        "params": n_params,
        "devices": len(jax.devices()),
    }


def run(argv: list[str]) -> None:
    """``mlgen bench diffusion [flags]``: one JSON line."""
    print(json.dumps(measure(argv)))
