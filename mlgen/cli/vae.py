"""``mlgen vae encode WORKDIR --out latents.npz`` and ``mlgen vae decode WORKDIR latents.npz
--out grid.png``: a trained VAE run (``task="vae"``), frozen, on a dataset.

``encode`` writes the latents of the run's own data (its ``data`` section: ``--split``) as an
``.npz`` of ``latents`` (unscaled, ``[N, h, w, c]``), ``labels``, ``scale`` (1 / std of these
latents: latent diffusion's scale factor) and ``vae_step``. ``decode`` reads ``latents`` from
such a file (or any ``.npz`` holding that key) and writes the images: a PNG grid or an ``.npz``
of ``images``. Every mistake is one line naming its flag or file, before the VAE is restored.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from mlgen.cli.args import Parser, at_least, output_file
from mlgen.config import InputError, check
from mlgen.data.images import load_arrays, save_grid
from mlgen.tasks.latent import load_vae, saved_vae_config, scale_factor


def _common(ap) -> None:
    ap.add_argument("workdir", help="a VAE run's workdir (task=vae)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw parameters, not their EMA")


def vae_main(argv: list[str]) -> int:
    """``mlgen vae encode|decode ...``."""
    ap = Parser(prog="mlgen vae", description="Encode images / decode latents with a VAE run.")
    sub = ap.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="the run's images -> latents.npz")
    _common(enc)
    enc.add_argument("--out", required=True, help="latents.npz")
    enc.add_argument("--split", choices=("train", "validation", "all"), default="all")
    enc.add_argument("--sample", action="store_true", help="draw from the posterior, not its mean")
    enc.add_argument("--seed", type=int, default=0, help="key of --sample")
    enc.add_argument("--num", type=int, default=None, help="only the first N images of the split")
    dec = sub.add_parser("decode", help="latents.npz -> a PNG grid or images.npz")
    _common(dec)
    dec.add_argument("latents", help="an .npz holding 'latents' [N, h, w, c] (unscaled)")
    dec.add_argument("--out", required=True, help="grid.png (a PNG grid) or x.npz (images)")
    dec.add_argument("--num", type=int, default=None, help="only the first N latents")
    dec.add_argument("--ncol", type=int, default=None, help="images per grid row")
    a = ap.parse_args(argv)
    return encode(a) if a.command == "encode" else decode(a)


def encode(a) -> int:
    output_file(a.out, "--out", (".npz",))
    at_least(a.num, 1, "--num")
    cfg = saved_vae_config(a.workdir, a.step)
    images, labels = load_arrays(cfg.data, a.split)
    if a.num is not None:
        images, labels = images[: a.num], labels[: a.num]
    vae = load_vae(a.workdir, step=a.step, use_ema=not a.no_ema)
    latents = vae.encode(images, sample=a.sample, key=jax.random.key(a.seed))
    scale = scale_factor(latents)
    np.savez(a.out, latents=latents, labels=labels, scale=np.float32(scale), vae_step=vae.step)
    print(
        f"wrote {len(latents)} latents {list(latents.shape[1:])} (scale factor {scale:.5f}, "
        f"VAE step {vae.step}) to {a.out}"
    )
    return 0


def decode(a) -> int:
    output_file(a.out, "--out", (".png", ".npz"))
    at_least(a.num, 1, "--num")
    at_least(a.ncol, 1, "--ncol")
    check(os.path.isfile(a.latents), "latents", f"no such file {a.latents!r}", InputError)
    try:
        with np.load(a.latents) as f:
            check("latents" in f, "latents", f"{a.latents!r} holds no 'latents' array", InputError)
            latents = np.asarray(f["latents"], np.float32)
    except (OSError, ValueError) as e:
        raise InputError(f"latents: {a.latents!r} is not an .npz file ({e})") from None
    if a.num is not None:
        latents = latents[: a.num]
    want = saved_vae_config(a.workdir, a.step).model.latent_shape
    check(
        latents.ndim == 4 and tuple(latents.shape[1:]) == tuple(want),
        "latents",
        f"{a.latents!r} holds latents of shape {list(latents.shape)}; this VAE decodes "
        f"[N, {', '.join(map(str, want))}]",
        InputError,
    )
    vae = load_vae(a.workdir, step=a.step, use_ema=not a.no_ema)
    images = vae.decode(latents)
    if a.out.endswith(".npz"):
        np.savez(a.out, images=images)
    else:
        save_grid(images, a.out, ncol=a.ncol)
    print(f"wrote {len(images)} images to {a.out}")
    return 0
