"""A tiny digits run through the one trainer (the shipped UNet config at unet-tiny's size):
loss falls, grids and plots, the CLI, the shared step; a smoke run of the shipped DiT config."""

import importlib
import inspect
import json
from pathlib import Path

import numpy as np
import pytest

import mlgen
from tests.helpers import replace, tiny_lm_config

step_lib = importlib.import_module("mlgen.train.step")
diffusion_task = importlib.import_module("mlgen.tasks.diffusion")

STEP_CALLS = []
PLOTTED_STEPS = []  # the last step in metrics.jsonl each time the loss plot was drawn


def _recording(make):
    def wrapped(loss_fn, *args, **kwargs):
        STEP_CALLS.append(loss_fn.__module__)
        return make(loss_fn, *args, **kwargs)

    return wrapped


# The shipped UNet config (configs/diffusion/digits_unet.py: cosine schedule, v prediction,
# min-SNR weighting, label dropout, EMA with warmup, AdamW with clipping) at the size of
# unet-tiny on 8x8 digits, 30 steps; it also stands in for that config's smoke run.
DIGITS_UNET = "configs/diffusion/digits_unet.py"
TINY_UNET = [
    "model.image_size=8",
    "model.channels=(8,16)",
    "model.head_dim=8",
    "model.num_groups=4",
    "data.image_size=8",
    "data.batch_size=16",
    "mesh.rules=fsdp",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    "train.num_steps=30",
    "train.log_every=10",
    "train.eval_every=30",
    "train.eval_steps=1",
    "train.checkpoint_every=30",
    "train.progress_bar=false",
    "train.async_checkpoints=false",
    "objective.sampling.steps=4",
    "objective.sampling.max_steps=8",
    "objective.sampling.per_class=2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits")
    mp = pytest.MonkeyPatch()
    mp.setattr(step_lib, "make_train_step", _recording(step_lib.make_train_step))
    plot = diffusion_task.plot_losses

    def recording_plot(wd):
        PLOTTED_STEPS.append(
            json.loads((Path(wd) / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        )
        return plot(wd)

    mp.setattr(diffusion_task, "plot_losses", recording_plot)
    try:
        result = mlgen.train(DIGITS_UNET, [f"workdir={workdir}", *TINY_UNET])
    finally:
        mp.undo()
    return workdir, result


def test_loss_falls_and_artifacts_are_written(run):
    workdir, result = run
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20, 30]
    assert lines[-1]["loss"] < 0.85 * lines[0]["loss"], lines
    assert "eval_loss" in lines[-1] and "x0_mse" in lines[-1]
    assert (workdir / "samples" / "step_000030.png").is_file()
    assert (workdir / "loss.png").is_file()
    assert PLOTTED_STEPS == [
        30
    ]  # the plot is drawn after the step's metrics are logged, so it shows them
    from PIL import Image

    grid = Image.open(workdir / "samples" / "step_000030.png")
    assert grid.size[1] > grid.size[0]  # 10 rows (classes) of 2 samples
    state = result.state
    assert set(state) >= {"params", "ema", "opt_state", "step"}

    def leaf(t):
        return np.asarray(t["conv_in"]["kernel"])

    assert not np.allclose(leaf(state["ema"]), leaf(state["params"]))


def test_lm_and_diffusion_train_through_the_same_step(run, tmp_path, monkeypatch):
    """Both tasks get their step from train/step.py via the trainer, and neither grows its own."""
    monkeypatch.setattr(step_lib, "make_train_step", _recording(step_lib.make_train_step))
    cfg = tiny_lm_config(str(tmp_path), num_layers=1, d_model=32)  # which step, not its size
    mlgen.train(
        replace(cfg, train=replace(cfg.train, num_steps=1, eval_every=0, checkpoint_every=1))
    )
    assert "mlgen.objectives.diffusion" in STEP_CALLS and "mlgen.objectives.lm" in STEP_CALLS
    import mlgen.objectives.diffusion as obj
    import mlgen.tasks.diffusion as task

    for mod in (task, obj):
        src = inspect.getsource(mod)
        for forbidden in ("value_and_grad", "optax", "apply_updates", "jax.grad("):
            assert forbidden not in src, f"{mod.__name__} computes its own updates ({forbidden})"


def test_sample_cli_writes_npz_and_grid(run, tmp_path):
    from mlgen.cli.sample import sample_main
    from mlgen.evaluation.digits import DigitScorer

    workdir, _ = run
    out = tmp_path / "x.npz"
    assert (
        sample_main(
            [
                str(workdir),
                "--num",
                "6",
                "--steps",
                "3",
                "--sampler",
                "heun",
                "--guidance",
                "1.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = np.load(out)
    assert data["images"].shape == (6, 8, 8, 1) and data["labels"].tolist() == [0, 1, 2, 3, 4, 5]
    assert np.all(np.abs(data["images"]) <= 1.0)
    assert sample_main([str(workdir), "--class", "7", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
    scores = DigitScorer(8).score(data["images"], data["labels"])
    assert 0.0 <= scores["confidence"] <= 1.0 and scores["frechet"] > scores["frechet_floor"]


def test_digits_dit_config_smoke(tmp_path):
    """The shipped DiT config (rectified flow, Euler sampling), shrunk to CI size (2 steps, one
    layer of width 32 at 8x8), runs end to end: data, model, objective, sampler hooks. The
    shipped UNet config is the module's run above (unet-tiny's size, 30 steps). Their
    full-size runs are measured by hand (see their docstrings). The text-to-image and
    super-resolution configs are not run here: their task paths train in
    tests/tasks/test_text_diffusion.py and test_superres.py at 8x8, and tests/test_configs.py
    validates the shipped files."""
    overrides = [
        f"workdir={tmp_path}",
        "train.num_steps=2",
        "train.log_every=1",
        "train.eval_every=2",
        "train.eval_steps=1",
        "train.checkpoint_every=2",
        "train.progress_bar=false",
        "train.async_checkpoints=false",
        "data.batch_size=16",
        "data.image_size=8",
        "model.image_size=8",
        "model.d_model=32",
        "model.num_layers=1",
        "model.num_heads=2",
        "objective.sampling.steps=2",
        "objective.sampling.max_steps=4",
        "objective.sampling.per_class=1",
    ]
    result = mlgen.train("configs/diffusion/digits_dit.py", overrides)
    assert [h["step"] for h in result.history] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert (tmp_path / "samples" / "step_000002.png").is_file()
    assert "ema" in result.state
