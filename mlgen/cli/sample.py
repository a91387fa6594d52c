"""``mlgen sample WORKDIR`` and ``mlgen eval WORKDIR``: restore a diffusion run and sample
from it."""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from mlgen import runs, sharding
from mlgen.data.images import save_grid
from mlgen.evaluation.digits import scorer
from mlgen.samplers.diffusion import SAMPLERS, grid_labels, sample_model
from mlgen.train.checkpoint import workdir_path
from mlgen.train.trainer import TrainResult


def _params(result: TrainResult, use_ema: bool):
    state = result.state
    return state["ema"] if use_ema and "ema" in state else state["params"]


def sample_main(argv: list[str]) -> int:
    """``mlgen sample WORKDIR --out grid.png|x.npz [...]``: sample images from a trained run."""
    ap = argparse.ArgumentParser(
        prog="mlgen sample", description="Sample images from a trained diffusion model."
    )
    ap.add_argument("workdir", help="a run's workdir (its checkpoints)")
    ap.add_argument(
        "--out",
        required=True,
        help="grid.png (a PNG grid, one row per class) or x.npz (raw samples)",
    )
    ap.add_argument(
        "--num", type=int, default=None, help="number of samples (default: per_class x classes)"
    )
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--sampler", choices=SAMPLERS, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--eta", type=float, default=None)
    ap.add_argument("--class", dest="cls", type=int, default=None, help="sample only this class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw parameters, not their EMA")
    ap.add_argument("overrides", nargs="*", help="config overrides for restoring, e.g. mesh.data=1")
    a = ap.parse_args(argv)

    result = runs.restore(a.workdir, a.overrides, step=a.step)
    cfg = result.config
    scfg = cfg.objective.sampling
    num_classes = cfg.model.num_classes
    if num_classes:
        if a.cls is not None:
            if not 0 <= a.cls < num_classes:
                print(f"mlgen sample: --class must be in [0, {num_classes})", file=sys.stderr)
                return 2
            labels = np.full((a.num or scfg.per_class,), a.cls, np.int32)
        elif a.num is not None:
            labels = np.arange(a.num, dtype=np.int32) % num_classes
        else:
            labels = grid_labels(num_classes, scfg.per_class)
        n = len(labels)
    else:
        labels = None
        n = a.num or scfg.per_class * 10
    overrides = {
        k: v
        for k, v in dict(sampler=a.sampler, steps=a.steps, guidance=a.guidance, eta=a.eta).items()
        if v is not None
    }
    with sharding.use(result.mesh, result.rules):
        x = sample_model(
            result.graphdef,
            _params(result, scfg.use_ema and not a.no_ema),
            cfg.objective,
            cfg.model,
            scfg,
            num=n,
            key=jax.random.key(a.seed),
            labels=labels,
            model_state=result.state.get("model_state"),
            **overrides,
        )
    images = np.asarray(jax.device_get(x))
    if a.out.endswith(".npz"):
        arrays = {"images": images}
        if labels is not None:
            arrays["labels"] = labels
        np.savez(a.out, **arrays)
    else:
        nrow = scfg.per_class if labels is not None and a.cls is None and a.num is None else None
        save_grid(images, a.out, ncol=nrow)
    print(f"wrote {len(images)} samples to {a.out}")
    return 0


def eval_main(argv: list[str]) -> int:
    """``mlgen eval WORKDIR``: sample a digits diffusion run and score the samples."""
    ap = argparse.ArgumentParser(
        prog="mlgen eval", description="Score a digits diffusion model's samples."
    )
    ap.add_argument("workdir")
    ap.add_argument(
        "--num", type=int, default=1000, help="samples (spread evenly over the classes)"
    )
    ap.add_argument("--batch", type=int, default=250, help="samples drawn per sampler call")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--sampler", choices=SAMPLERS, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)

    result = runs.restore(a.workdir, a.overrides, step=a.step)
    cfg = result.config
    if getattr(cfg.data, "source", None) != "digits":
        print("mlgen eval: only digits runs (data.source=digits) can be scored", file=sys.stderr)
        return 2
    scfg = cfg.objective.sampling
    over = {
        k: v
        for k, v in dict(sampler=a.sampler, steps=a.steps, guidance=a.guidance).items()
        if v is not None
    }
    params = _params(result, scfg.use_ema and not a.no_ema)
    classes = cfg.model.num_classes
    labels = np.arange(a.num, dtype=np.int32) % classes if classes else None
    chunks = []
    with sharding.use(result.mesh, result.rules):
        for i, start in enumerate(range(0, a.num, a.batch)):
            n = min(a.batch, a.num - start)
            lab = labels[start : start + n] if labels is not None else None
            x = sample_model(
                result.graphdef,
                params,
                cfg.objective,
                cfg.model,
                scfg,
                num=n,
                key=jax.random.fold_in(jax.random.key(a.seed), i),
                labels=lab,
                model_state=result.state.get("model_state"),
                **over,
            )
            chunks.append(np.asarray(jax.device_get(x)))
    images = np.concatenate(chunks)
    scores = scorer(cfg.model.image_size).score(images, labels)
    scores.update(
        step=int(result.state["step"]),
        sampler=over.get("sampler", scfg.sampler),
        steps=over.get("steps", scfg.steps),
        guidance=over.get("guidance", scfg.guidance),
    )
    line = json.dumps(scores)
    print(line)
    (workdir_path(a.workdir) / "eval.json").write_text(line + "\n")
    return 0
