"""``mlgen sample`` / ``mlgen eval`` of a super-resolution run (``task="superres"``).

- ``mlgen sample SR_WORKDIR --base BASE_WORKDIR --out grid.png``: the cascade: the base run
  (a diffusion run at the upsampler's ``low_res_size``) samples low-res images, the upsampler
  upsamples them; class labels (``--class``, ``--num``) go to each class-conditional stage,
  and a text-to-image base takes ``--prompt`` (an upsampler without classes follows any base).
  Without ``--base`` the upsampler is fed held-out real low-res images (of the asked classes).
- ``mlgen eval SR_WORKDIR [--base BASE_WORKDIR]``: scores the high-resolution output (digits
  classifier accuracy, Fréchet at the upsampler's size) of the cascade, or of the upsampler
  fed held-out real low-res digits; beside it the same scores of naive (bicubic, nearest)
  upsampling of the same low-res images, and with ``--base`` the base samples' own scores at
  the low resolution. A text-to-image base is prompted with the held-out caption templates
  (classes in turn), and the classes of its prompts are what accuracy is scored against.
  Written to ``SR_WORKDIR/eval.json`` too.

The sampler flags (``--steps``, ``--guidance``, ...) set the upsampler's sampler; the base
stage samples as its run's ``objective.sampling`` says. ``--aug-level`` sets the noise
augmentation of the low-res input (default: the run's ``objective.sample_aug``).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mlgen import runs, sharding
from mlgen.config import Config, InputError, check
from mlgen.data.images import save_grid
from mlgen.evaluation.digits import scorer
from mlgen.nn.lowres import upsample as resize
from mlgen.objectives.diffusion import DiffusionObjectiveConfig
from mlgen.objectives.superres import SuperResObjectiveConfig
from mlgen.samplers.cascade import Stage, check_chain, upsample
from mlgen.samplers.diffusion import sample_model
from mlgen.tasks import text as text_lib
from mlgen.tasks.superres import held_out_low_res
from mlgen.train.checkpoint import workdir_path
from mlgen.train.trainer import TrainResult

__all__ = ["Cascade", "base_config", "eval_main", "is_superres", "load", "sample_main"]


DIGIT_CLASSES = 10  # what mlgen eval scores: the digits


def is_superres(cfg: Config) -> bool:
    return isinstance(cfg.objective, SuperResObjectiveConfig)


def _check_flags(cfg: Config, base: str | None, aug_level: float | None) -> None:
    sr = is_superres(cfg)
    check(
        sr or base is None,
        "--base",
        f"{cfg.workdir!r} is no super-resolution run (task={cfg.task!r}); --base chains a base "
        "run into an upsampler",
        InputError,
    )
    check(
        sr or aug_level is None,
        "--aug-level",
        "only a super-resolution run takes a noise-augmentation level",
        InputError,
    )
    check(
        aug_level is None or 0.0 <= aug_level < 1.0,
        "--aug-level",
        f"must be in [0, 1), got {aug_level}",
        InputError,
    )


def base_config(workdir: str, sr_cfg: Config) -> Config:
    """The saved config of the base run ``workdir``, checked to chain into ``sr_cfg``'s
    upsampler (InputError naming ``--base``)."""
    cfg = runs.saved_config(workdir)
    check(
        isinstance(cfg.objective, DiffusionObjectiveConfig) and not is_superres(cfg),
        "--base",
        f"{workdir!r} is a {cfg.task} run, not a (base) diffusion run",
        InputError,
    )
    check(not cfg.data.vae, "--base", f"{workdir!r} is a latent diffusion run", InputError)
    try:
        check_chain(cfg.model, sr_cfg.model)
    except ValueError as e:
        raise InputError(f"--base: {workdir!r}: {e}") from None
    return cfg


def _stage(cfg: Config, result: TrainResult, use_ema: bool, overrides: dict) -> Stage:
    state = result.state
    params = state["ema"] if use_ema and "ema" in state else state["params"]
    scfg = cfg.objective.sampling
    return Stage(
        result.graphdef, params, cfg.objective, cfg.model, scfg, state.get("model_state"), overrides
    )


class Cascade:
    """The restored upsampler (and base run): draws high-res samples for given labels."""

    def __init__(self, cfg: Config, result: TrainResult, stage: Stage, base=None):
        self.cfg, self.result, self.stage = cfg, result, stage
        self.base = base  # (config, result, stage) or None

    def low_res(self, labels, n: int, key, text: dict | None = None) -> np.ndarray:
        """``n`` low-res inputs: the base run's samples, or held-out real ones of ``labels``.
        ``text``: a text base's ``cond`` / ``null_cond`` (its prompts)."""
        if self.base is None:
            return _held_out_for(self.cfg, labels, n)
        base_cfg, result, st = self.base
        labels = labels if base_cfg.model.num_classes else None
        with sharding.use(result.mesh, result.rules):
            x = sample_model(
                st.graphdef,
                st.params,
                st.objective,
                st.model,
                st.sampling,
                num=n,
                key=key,
                labels=labels,
                model_state=st.model_state,
                **(text or {}),
                **st.overrides,
            )
        return np.asarray(jax.device_get(x))

    def high_res(self, low: np.ndarray, labels, key, aug_level) -> np.ndarray:
        r = self.result
        labels = labels if self.cfg.model.num_classes else None
        with sharding.use(r.mesh, r.rules):
            x = upsample(self.stage, jnp.asarray(low), key=key, labels=labels, aug_level=aug_level)
        return np.asarray(jax.device_get(x))


def load(cfg: Config, a, overrides: dict) -> Cascade:
    """Checks ``--base`` / ``--aug-level`` and restores the upsampler (and base run)."""
    _check_flags(cfg, a.base, a.aug_level)
    base_cfg = base_config(a.base, cfg) if a.base else None
    use_ema = cfg.objective.sampling.use_ema and not a.no_ema
    result = runs.restore(cfg, step=a.step)
    stage = _stage(cfg, result, use_ema, overrides)
    base = None
    if base_cfg is not None:
        b = runs.restore(base_cfg)
        base = (base_cfg, b, _stage(base_cfg, b, base_cfg.objective.sampling.use_ema, {}))
    return Cascade(cfg, result, stage, base)


def _held_out_for(cfg: Config, labels, n: int) -> np.ndarray:
    """Held-out low-res images: for each asked label the next example of its class in turn (or
    the first ``n``, cycling, for an unconditional model)."""
    _, low, have = held_out_low_res(cfg.data)
    if labels is None:
        return low[np.arange(n) % len(low)]
    out, seen = [], {}
    for lab in np.asarray(labels):
        idx = np.flatnonzero(have == lab)
        check(len(idx) > 0, "--class", f"no held-out image of class {lab}", InputError)
        k = seen.get(int(lab), 0)
        out.append(low[idx[k % len(idx)]])
        seen[int(lab)] = k + 1
    return np.stack(out)


def sample(cascade: Cascade, labels, n: int, key, aug_level, text: dict | None = None):
    """``(high_res, low_res)`` samples (one batch); ``text``: a text base's prompts."""
    k_low, k_high = jax.random.split(key)
    low = cascade.low_res(labels, n, k_low, text)
    return cascade.high_res(low, labels, k_high, aug_level), low


def naive(low: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Bicubic and nearest upsampling of ``low`` to ``size`` (the baselines of ``mlgen eval``)."""
    x = jnp.asarray(low)
    b, _, _, c = x.shape
    return {
        "bicubic": np.asarray(jax.image.resize(x, (b, size, size, c), "bicubic")).clip(-1, 1),
        "nearest": np.asarray(resize(x, size, "nearest")),
    }


def sample_main(
    a, cfg: Config, overrides: dict, labels, n: int, text: dict, ncol: int | None
) -> int:
    """``mlgen sample SR_WORKDIR [--base BASE_WORKDIR]`` after ``mlgen.cli.sample`` parsed and
    checked the common flags (the labels, or a text base's prompts as ``text`` with ``ncol``
    samples per prompt): writes the high-res samples (``.npz``: also ``low_res``)."""
    cascade = load(cfg, a, overrides)
    high, low = sample(cascade, labels, n, jax.random.key(a.seed), a.aug_level, text or None)
    epath.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    if a.out.endswith(".npz"):
        arrays = {"images": high, "low_res": low}
        if labels is not None:
            arrays["labels"] = labels
        np.savez(a.out, **arrays)
    else:
        per_class = cfg.objective.sampling.per_class
        grid = labels is not None and a.cls is None and a.num is None
        save_grid(high, a.out, ncol=ncol or (per_class if grid else None))
    src = f"the base run {a.base!r}" if a.base else "held-out real low-res images"
    print(f"wrote {len(high)} samples upsampled from {src} to {a.out}")
    return 0


def eval_main(a, cfg: Config, over: dict) -> int:
    """``mlgen eval SR_WORKDIR [--base BASE_WORKDIR]``: one JSON line of scores (and
    ``SR_WORKDIR/eval.json``)."""
    cascade = load(cfg, a, over)
    base_cfg = cascade.base[0] if cascade.base is not None else None
    prompts = None
    if base_cfg is not None and text_lib.is_text(base_cfg.model):
        labels, prompts = text_lib.eval_prompts(a.num)  # held-out templates, classes in turn
    else:  # the classes of a class-conditional base; held-out real digits of every class
        classes = base_cfg.model.num_classes if base_cfg is not None else DIGIT_CLASSES
        labels = np.arange(a.num, dtype=np.int32) % classes if classes else None
    highs, lows = [], []
    for i, start in enumerate(range(0, a.num, a.batch)):
        n = min(a.batch, a.num - start)
        lab = labels[start : start + n] if labels is not None else None
        text = None
        if prompts is not None:
            text = text_lib.prompt_inputs(base_cfg.model, prompts[start : start + n])
        key = jax.random.fold_in(jax.random.key(a.seed), i)
        high, low = sample(cascade, lab, n, key, a.aug_level, text)
        highs.append(high)
        lows.append(low)
    high, low = np.concatenate(highs), np.concatenate(lows)
    size = cfg.data.image_size
    score = scorer(size).score
    scores = score(high, labels)
    scores["naive"] = {
        name: {k: v for k, v in score(x, labels).items() if k in ("accuracy", "frechet")}
        for name, x in naive(low, size).items()
    }
    # The scorer's classifier projects on 32 PCA components: images of fewer pixels go unscored.
    if base_cfg is not None and base_cfg.data.image_size**2 * base_cfg.data.channels >= 32:
        base = scorer(base_cfg.data.image_size).score(low, labels)
        scores["base"] = {k: base[k] for k in ("accuracy", "frechet", "frechet_floor") if k in base}
    st = cascade.stage
    scores.update(
        step=int(cascade.result.state["step"]),
        low_res="base" if a.base else "held-out",
        base_workdir=a.base,
        aug_level=cfg.objective.sample_aug if a.aug_level is None else a.aug_level,
        sampler=st.overrides.get("sampler", st.sampling.sampler),
        steps=st.overrides.get("steps", st.sampling.steps),
        guidance=st.overrides.get("guidance", st.sampling.guidance),
    )
    line = json.dumps(scores)
    print(line)
    (workdir_path(a.workdir) / "eval.json").write_text(line + "\n")
    return 0
