"""``mlgen sample WORKDIR`` and ``mlgen eval WORKDIR``: restore a diffusion run and sample
from it.

Every mistake is one line naming its flag, found before the weights are restored: the counts,
the sampler settings (``--sampler``, ``--steps``, ``--guidance``, ``--guidance-rescale``,
``--eta`` are checked as the run's ``objective.sampling`` would be: ``--steps`` in
[1, max_steps], ``--guidance-rescale`` in [0, 1]), ``--class`` (a conditional
model's class), ``--out`` (a .png or .npz that can be written), the workdir (a diffusion run with
a checkpoint; ``mlgen eval`` also writes ``WORKDIR/eval.json``, so it must be writable).

Text-to-image runs (``model.context_dim > 0``): ``mlgen sample --prompt "a handwritten seven"
[--prompt ...] [--num N]`` draws N samples per prompt, one grid row each (default: one row per
digit from a held-out caption template); ``mlgen eval`` prompts with the held-out templates
(``mlgen.data.captions.EVAL_TEMPLATES``) and scores the class accuracy of the prompted digits.

A super-resolution run (``task="superres"``) samples and scores through
:mod:`mlgen.cli.superres`: ``--base BASE_WORKDIR`` chains a base run into it (``--class`` /
``--prompt`` are then the base run's: ``mlgen sample SR --base TEXT_RUN --prompt "a
handwritten seven"``), ``--aug-level`` sets the noise augmentation of its low-res input.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
from etils import epath

from mlgen import runs, sharding
from mlgen.cli import superres
from mlgen.cli.args import Parser, at_least, output_file
from mlgen.config import Config, ConfigError, InputError, check
from mlgen.data.captions import EVAL_TEMPLATES
from mlgen.data.images import save_grid
from mlgen.data.paths import unwritable
from mlgen.evaluation.digits import scorer
from mlgen.models.family import family_of
from mlgen.objectives.diffusion import DiffusionObjectiveConfig, SamplerConfig
from mlgen.samplers.diffusion import SAMPLERS, grid_labels, sample_model
from mlgen.tasks import text as text_lib
from mlgen.tasks.latent import to_images
from mlgen.train.checkpoint import workdir_path
from mlgen.train.trainer import TrainResult

_FLAGS = {
    "steps": "--steps",
    "guidance": "--guidance",
    "guidance_rescale": "--guidance-rescale",
    "eta": "--eta",
    "sampler": "--sampler",
}


def _diffusion_run(workdir: str, overrides, step: int | None) -> Config:
    """The saved config of the diffusion run in ``workdir`` (InputError naming ``workdir`` for
    a missing run or one of another kind)."""
    cfg = runs.saved_config(workdir, overrides, step=step)
    family = family_of(cfg.model)
    check(
        isinstance(cfg.objective, DiffusionObjectiveConfig),
        "workdir",
        f"{workdir!r} is a {cfg.task} run of a {family.name} {family.kind}, not a diffusion "
        "model (mlgen generate samples language models)",
        InputError,
    )
    return cfg


def _sampler_overrides(scfg: SamplerConfig, **flags) -> dict:
    """The flags given (not None), checked as the run's sampler config checks them."""
    over = {k: v for k, v in flags.items() if v is not None}
    try:
        dataclasses.replace(scfg, **over).validate()
    except ConfigError as e:
        field, _, msg = str(e).partition(": ")
        raise InputError(f"{_FLAGS.get(field, field)}: {msg}") from None
    return over


def _params(result: TrainResult, use_ema: bool):
    state = result.state
    return state["ema"] if use_ema and "ema" in state else state["params"]


def sample_main(argv: list[str]) -> int:
    """``mlgen sample WORKDIR --out grid.png|x.npz [...]``: sample images from a trained run."""
    ap = Parser(prog="mlgen sample", description="Sample images from a trained diffusion model.")
    ap.add_argument("workdir", help="a run's workdir (its checkpoints)")
    ap.add_argument(
        "--out",
        required=True,
        help="grid.png (a PNG grid, one row per class) or x.npz (raw samples)",
    )
    ap.add_argument(
        "--num",
        type=int,
        default=None,
        help="number of samples (default: per_class x classes; text runs: per prompt)",
    )
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--sampler", choices=SAMPLERS, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--guidance-rescale", type=float, default=None, help="phi in [0, 1]; 0 = off")
    ap.add_argument("--eta", type=float, default=None)
    ap.add_argument("--class", dest="cls", type=int, default=None, help="sample only this class")
    ap.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="text-to-image runs: a prompt (repeat for one grid row each; '' = unconditional)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw parameters, not their EMA")
    ap.add_argument("--base", default=None, help="super-resolution: the base run's workdir")
    ap.add_argument(
        "--aug-level", type=float, default=None, help="super-resolution: low-res noise level"
    )
    ap.add_argument("overrides", nargs="*", help="config overrides for restoring, e.g. mesh.data=1")
    a = ap.parse_args(argv)
    at_least(a.num, 1, "--num")
    output_file(a.out, "--out", (".png", ".npz"))
    cfg = _diffusion_run(a.workdir, a.overrides, a.step)
    scfg = cfg.objective.sampling
    overrides = _sampler_overrides(
        scfg,
        sampler=a.sampler,
        steps=a.steps,
        guidance=a.guidance,
        guidance_rescale=a.guidance_rescale,
        eta=a.eta,
    )
    # A cascade's labels or prompts are the base run's (checked to chain, before restoring).
    lead = superres.base_config(a.base, cfg) if a.base and superres.is_superres(cfg) else cfg
    num_classes = lead.model.num_classes
    text, ncol = _text_inputs(lead, a)
    if text:
        labels = None
        n = len(text["cond"]["text_tokens"])
    elif num_classes:
        if a.cls is not None:
            check(
                0 <= a.cls < num_classes,
                "--class",
                f"must be in [0, {num_classes}), got {a.cls}",
                InputError,
            )
            labels = np.full((a.num or scfg.per_class,), a.cls, np.int32)
        elif a.num is not None:
            labels = np.arange(a.num, dtype=np.int32) % num_classes
        else:
            labels = grid_labels(num_classes, scfg.per_class)
        n = len(labels)
    else:
        check(
            a.cls is None, "--class", "the model is unconditional (model.num_classes=0)", InputError
        )
        labels = None
        n = a.num or scfg.per_class * 10
    if superres.is_superres(cfg) or a.base or a.aug_level is not None:
        return superres.sample_main(a, cfg, overrides, labels, n, text, ncol)
    result = runs.restore(cfg, step=a.step)
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
            **text,
            **overrides,
        )
    images = to_images(cfg, x)  # latent diffusion (data.vae): decoded by its VAE
    epath.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    if a.out.endswith(".npz"):
        arrays = {"images": images}
        if labels is not None:
            arrays["labels"] = labels
        np.savez(a.out, **arrays)
    else:
        nrow = scfg.per_class if labels is not None and a.cls is None and a.num is None else None
        save_grid(images, a.out, ncol=ncol or nrow)
    print(f"wrote {len(images)} samples to {a.out}")
    return 0


def _text_inputs(cfg: Config, a) -> tuple[dict, int | None]:
    """A text run's ``cond`` / ``null_cond`` for ``sample_model`` from ``--prompt`` / ``--num``
    (per prompt), and the grid's columns; ``({}, None)`` for other runs."""
    if not text_lib.is_text(cfg.model):
        check(
            a.prompt is None,
            "--prompt",
            "the model is not text-conditioned (model.context_dim=0)",
            InputError,
        )
        return {}, None
    check(a.cls is None, "--class", "the model is text-conditioned; use --prompt", InputError)
    per = a.num or cfg.objective.sampling.per_class
    prompts = a.prompt or text_lib.grid_prompts(10, 1)
    limit = cfg.model.text.max_len
    for p, n in zip(prompts, text_lib.prompt_lengths(cfg.model, prompts)):
        check(
            n <= limit,
            "--prompt",
            f"{p!r} is {n} tokens; the model reads at most model.text.max_len={limit}",
            InputError,
        )
    rows = [p for p in prompts for _ in range(per)]
    return text_lib.prompt_inputs(cfg.model, rows), per


def eval_main(argv: list[str]) -> int:
    """``mlgen eval WORKDIR``: sample a digits diffusion run and score the samples."""
    ap = Parser(prog="mlgen eval", description="Score a digits diffusion model's samples.")
    ap.add_argument("workdir")
    ap.add_argument(
        "--num", type=int, default=1000, help="samples (spread evenly over the classes)"
    )
    ap.add_argument("--batch", type=int, default=250, help="samples drawn per sampler call")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--sampler", choices=SAMPLERS, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--guidance-rescale", type=float, default=None, help="phi in [0, 1]; 0 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--base", default=None, help="super-resolution: the base run's workdir")
    ap.add_argument(
        "--aug-level", type=float, default=None, help="super-resolution: low-res noise level"
    )
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    at_least(a.num, 1, "--num")
    at_least(a.batch, 1, "--batch")
    cfg = _diffusion_run(a.workdir, a.overrides, a.step)
    check(
        cfg.data.source == "digits",
        "workdir",
        f"{a.workdir!r} trained on data.source={cfg.data.source!r}; only digits runs can be scored",
        InputError,
    )
    why = unwritable(a.workdir)
    check(why is None, "workdir", f"{a.workdir!r} {why} (eval writes eval.json there)", InputError)
    scfg = cfg.objective.sampling
    over = _sampler_overrides(
        scfg,
        sampler=a.sampler,
        steps=a.steps,
        guidance=a.guidance,
        guidance_rescale=a.guidance_rescale,
    )
    if superres.is_superres(cfg) or a.base or a.aug_level is not None:
        return superres.eval_main(a, cfg, over)
    result = runs.restore(cfg, step=a.step)
    params = _params(result, scfg.use_ema and not a.no_ema)
    classes = cfg.model.num_classes
    labels = np.arange(a.num, dtype=np.int32) % classes if classes else None
    text = text_lib.is_text(cfg.model)
    if text:  # held-out caption templates, classes in turn
        labels, prompts = text_lib.eval_prompts(a.num)
    chunks = []
    with sharding.use(result.mesh, result.rules):
        for i, start in enumerate(range(0, a.num, a.batch)):
            n = min(a.batch, a.num - start)
            lab = labels[start : start + n] if labels is not None else None
            extra = {}
            if text:
                extra = text_lib.prompt_inputs(cfg.model, prompts[start : start + n])
                lab = None
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
                **extra,
                **over,
            )
            chunks.append(np.asarray(jax.device_get(x)))
    images = to_images(cfg, np.concatenate(chunks))
    scores = scorer(cfg.data.image_size).score(images, labels)
    if text:
        scores["prompts"] = "held-out templates: " + " | ".join(EVAL_TEMPLATES)
    scores.update(
        step=int(result.state["step"]),
        sampler=over.get("sampler", scfg.sampler),
        steps=over.get("steps", scfg.steps),
        guidance=over.get("guidance", scfg.guidance),
        guidance_rescale=over.get("guidance_rescale", scfg.guidance_rescale),
    )
    line = json.dumps(scores)
    print(line)
    (workdir_path(a.workdir) / "eval.json").write_text(line + "\n")
    return 0
