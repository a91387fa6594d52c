"""The text-to-image cascade (Imagen's recipe at digits scale): a text-conditioned base run at
4x4 chained into an upsampler without classes (4x4 -> 8x8). The prompts reach the base stage
only, no class labels reach a stage that has no classes, ``mlgen sample --base TEXT_RUN
--prompt`` and ``mlgen eval --base TEXT_RUN`` run end to end, and a chain that cannot work is
one line naming ``model.num_classes``. Both runs train 2 steps: sample quality is not what this
checks (the shipped configs' docstrings have the measured scores)."""

import dataclasses
import importlib
import json

import jax
import numpy as np
import pytest

import mlgen
from mlgen.cli.sample import eval_main, sample_main
from mlgen.config import Config, InputError, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.images import ImageDataConfig
from mlgen.models.encoder import EncoderConfig
from mlgen.models.text import TextConfig
from mlgen.models.unet import PRESETS
from mlgen.objectives.diffusion import DiffusionObjectiveConfig, SamplerConfig
from mlgen.objectives.superres import SuperResObjectiveConfig
from mlgen.samplers.cascade import Stage, cascade, check_chain
from mlgen.tasks import text as text_lib

cascade_lib = importlib.import_module("mlgen.samplers.cascade")

SAMPLING = SamplerConfig(sampler="ddim", steps=2, per_class=1, max_steps=4, guidance=2.0)
TRAIN = TrainConfig(
    num_steps=2,
    log_every=1,
    eval_every=0,
    checkpoint_every=2,
    progress_bar=False,
    async_checkpoints=False,
)
TEXT = TextConfig(
    encoder=EncoderConfig(vocab_size=256, num_layers=1, d_model=16, num_heads=2), max_len=24
)
TEXT_BASE = dataclasses.replace(
    PRESETS["unet-tiny"], image_size=4, num_classes=0, context_dim=16, text=TEXT
)
SR = dataclasses.replace(
    PRESETS["unet-tiny"], attention_levels=(), num_classes=0, low_res_channels=1, low_res_size=4
)


def _config(workdir: str, task: str, model, data, objective) -> Config:
    return Config(
        task=task,
        workdir=workdir,
        seed=0,
        model=model,
        data=data,
        objective=objective,
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0),
        train=TRAIN,
    )


def text_config(workdir: str) -> Config:
    data = ImageDataConfig(source="digits", image_size=4, batch_size=16)
    objective = DiffusionObjectiveConfig(prediction="v", label_dropout=0.1, sampling=SAMPLING)
    return _config(workdir, "diffusion", TEXT_BASE, data, objective)


def sr_config(workdir: str) -> Config:
    data = ImageDataConfig(source="digits", image_size=8, low_res_size=4, batch_size=16)
    objective = SuperResObjectiveConfig(
        prediction="v", sample_aug=0.1, sampling=dataclasses.replace(SAMPLING, guidance=1.0)
    )
    return _config(workdir, "superres", SR, data, objective)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    text_dir, sr_dir = tmp_path_factory.mktemp("text"), tmp_path_factory.mktemp("sr")
    text_run = mlgen.train(text_config(str(text_dir)))
    sr_run = mlgen.train(sr_config(str(sr_dir)))
    return (text_dir, text_run), (sr_dir, sr_run)


def _stage(cfg: Config, result) -> Stage:
    return Stage(result.graphdef, result.state["params"], cfg.objective, cfg.model, SAMPLING)


def test_prompts_reach_the_base_and_no_labels_reach_stages_without_classes(runs, monkeypatch):
    (text_dir, text_run), (sr_dir, sr_run) = runs
    calls = []
    real = cascade_lib.sample_model

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(cascade_lib, "sample_model", spy)
    base_cfg = text_config(str(text_dir))
    prompts = ["a handwritten seven", "the digit 3", ""]
    cond = text_lib.prompt_cond(base_cfg.model, prompts)
    labels = np.array([7, 3, 0], np.int32)  # known to the caller, wanted by no stage here
    high, low = cascade(
        _stage(base_cfg, text_run),
        _stage(sr_config(str(sr_dir)), sr_run),
        num=3,
        key=jax.random.key(0),
        labels=labels,
        base_cond=cond,
        base_null_cond=text_lib.null_cond(base_cfg.model),
    )
    assert high.shape == (3, 8, 8, 1) and low.shape == (3, 4, 4, 1)
    assert np.all(np.isfinite(np.asarray(high)))
    base_call, sr_call = calls
    assert base_call["labels"] is None and sr_call["labels"] is None
    np.testing.assert_array_equal(base_call["cond"]["text_tokens"], cond["text_tokens"])
    assert base_call["null_cond"]["text_mask"] == 0  # the empty prompt: guidance's null
    assert set(sr_call["cond"]) == {"low_res", "low_res_aug"}  # no text reaches the upsampler


def test_cli_samples_and_scores_the_text_cascade(runs, tmp_path):
    (text_dir, _), (sr_dir, _) = runs
    out = tmp_path / "x.npz"
    prompts = ["--prompt", "a handwritten seven", "--prompt", "the digit 3"]
    args = [str(sr_dir), "--base", str(text_dir), *prompts, "--num", "2", "--out", str(out)]
    assert sample_main(args) == 0
    data = np.load(out)
    assert data["images"].shape == (4, 8, 8, 1) and data["low_res"].shape == (4, 4, 4, 1)
    assert "labels" not in data
    grid = tmp_path / "g.png"
    assert sample_main([str(sr_dir), "--base", str(text_dir), *prompts, "--out", str(grid)]) == 0
    assert grid.exists()
    assert eval_main([str(sr_dir), "--base", str(text_dir), "--num", "20", "--batch", "10"]) == 0
    scores = json.loads((sr_dir / "eval.json").read_text())
    assert scores["low_res"] == "base" and scores["base_workdir"] == str(text_dir)
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["frechet"] > 0
    with pytest.raises(InputError, match="^--class: the model is text-conditioned; use --prompt"):
        sample_main([str(sr_dir), "--base", str(text_dir), "--class", "3", "--out", str(out)])
    too_long = "a handwritten seven, drawn with care"
    with pytest.raises(InputError, match="^--prompt: .* tokens; the model reads at most"):
        sample_main([str(sr_dir), "--base", str(text_dir), "--prompt", too_long, "--out", str(out)])
    with pytest.raises(InputError, match="^--prompt: the model is not text-conditioned"):
        sample_main([str(sr_dir), "--prompt", "a seven", "--out", str(out)])


def test_chains_that_cannot_work_name_model_num_classes():
    classy_sr = dataclasses.replace(SR, num_classes=10)
    with pytest.raises(ValueError, match="^model.num_classes: the upsampler takes class labels"):
        check_chain(TEXT_BASE, classy_sr)
    classy_base = dataclasses.replace(TEXT_BASE, num_classes=5, context_dim=0)
    with pytest.raises(ValueError, match="^model.num_classes: the base model has 5 classes"):
        check_chain(classy_base, classy_sr)
    check_chain(classy_base, SR)  # a class-conditional base feeds an upsampler without classes
    check_chain(TEXT_BASE, SR)
