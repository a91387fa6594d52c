"""Super-resolution: a tiny 4x4 -> 8x8 digits upsampler trained through the one trainer (loss
falls, the low-res input matters), noise augmentation at train and sampling time, the cascade
base -> upsampler, the CLI, and one-line errors for mismatched sizes."""

import dataclasses
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import mlgen
from mlgen.cli.sample import eval_main, sample_main
from mlgen.config import Config, ConfigError, InputError, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.images import ImageDataConfig, downsample_area, make_image_data
from mlgen.models.dit import DiT, DiTConfig
from mlgen.models.unet import PRESETS, UNet
from mlgen.objectives import schedules
from mlgen.objectives.diffusion import DiffusionObjectiveConfig, SamplerConfig
from mlgen.objectives.superres import SuperResObjectiveConfig, augment, make_sr_loss
from mlgen.samplers.cascade import Stage, cascade, check_chain, upsample

cascade_lib = importlib.import_module("mlgen.samplers.cascade")
superres_obj = importlib.import_module("mlgen.objectives.superres")

SR_MODEL = dataclasses.replace(
    PRESETS["unet-tiny"], num_classes=10, low_res_channels=1, low_res_size=4
)
SAMPLING = SamplerConfig(sampler="ddim", steps=3, per_class=2, max_steps=4, guidance=1.5)
TRAIN = TrainConfig(
    num_steps=30,
    log_every=10,
    eval_every=30,
    eval_steps=1,
    checkpoint_every=30,
    progress_bar=False,
    async_checkpoints=False,
    ema_decay=0.9,
)


def sr_config(workdir: str) -> Config:
    return Config(
        task="superres",
        workdir=workdir,
        seed=0,
        model=SR_MODEL,
        data=ImageDataConfig(source="digits", image_size=8, low_res_size=4, batch_size=16),
        objective=SuperResObjectiveConfig(
            prediction="v", aug_max=0.4, sample_aug=0.2, sampling=SAMPLING
        ),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
        train=TRAIN,
    )


def base_config(workdir: str) -> Config:
    """A base diffusion run at the upsampler's 4x4 (2 steps: its quality is not the point)."""
    model = dataclasses.replace(PRESETS["unet-tiny"], num_classes=10, image_size=4)
    return Config(
        task="diffusion",
        workdir=workdir,
        seed=0,
        model=model,
        data=ImageDataConfig(source="digits", image_size=4, batch_size=16),
        objective=DiffusionObjectiveConfig(prediction="v", sampling=SAMPLING),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0),
        train=dataclasses.replace(
            TRAIN, num_steps=2, log_every=1, eval_every=0, checkpoint_every=2
        ),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sr_dir, base_dir = tmp_path_factory.mktemp("sr"), tmp_path_factory.mktemp("base")
    return (sr_dir, mlgen.train(sr_config(str(sr_dir)))), (
        base_dir,
        mlgen.train(base_config(str(base_dir))),
    )


def _stage(cfg: Config, result, **overrides) -> Stage:
    return Stage(
        result.graphdef,
        result.state["params"],
        cfg.objective,
        cfg.model,
        cfg.objective.sampling,
        overrides=overrides,
    )


def test_data_adds_area_downsampled_low_res():
    cfg = ImageDataConfig(source="digits", image_size=8, low_res_size=4, batch_size=4)
    batch = next(make_image_data(cfg, split="validation", seed=0))
    assert batch["low_res"].shape == (4, 4, 4, 1)
    want = batch["images"].reshape(4, 4, 2, 4, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(batch["low_res"], want, rtol=1e-6)


def test_folder_data_add_low_res_after_the_flip(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    cfg = ImageDataConfig(
        source="folder",
        path=str(tmp_path),
        image_size=8,
        channels=3,
        low_res_size=2,
        batch_size=2,
        hflip=True,
        val_fraction=0.25,
    )
    batch = next(make_image_data(cfg, split="train", seed=0))
    assert batch["low_res"].shape == (2, 2, 2, 3)
    np.testing.assert_allclose(batch["low_res"], downsample_area(batch["images"], 2), rtol=1e-6)


def test_loss_falls_grid_and_the_low_res_input_matters(runs):
    (sr_dir, result), _ = runs
    lines = [json.loads(x) for x in (sr_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 20, 30]
    assert lines[-1]["loss"] < 0.9 * lines[0]["loss"], lines
    assert "eval_loss" in lines[-1]
    assert (sr_dir / "samples" / "step_000030.png").is_file()

    model = nnx.merge(result.graphdef, result.state["params"])
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    t, labels = jnp.full((4,), 500.0), jnp.arange(4)
    low_a = jnp.asarray(downsample_area(np.asarray(jnp.tanh(x)), 4))
    out_a = model(x, t, labels, low_res=low_a, low_res_aug=jnp.zeros(4))
    out_b = model(x, t, labels, low_res=-low_a, low_res_aug=jnp.zeros(4))
    out_c = model(x, t, labels, low_res=low_a, low_res_aug=jnp.full(4, 0.9))
    assert out_a.shape == (4, 8, 8, 1)
    assert float(jnp.abs(out_a - out_b).mean()) > 1e-3  # the image conditions the output
    assert float(jnp.abs(out_a - out_c).mean()) > 1e-5  # so does its augmentation level


def test_dit_takes_the_low_res_input():
    cfg = DiTConfig(
        image_size=8,
        patch_size=2,
        d_model=32,
        num_layers=1,
        num_heads=2,
        low_res_channels=1,
        low_res_size=4,
    )
    model = DiT(cfg, rngs=nnx.Rngs(params=0))
    out = model(jnp.zeros((2, 8, 8, 1)), jnp.ones(2), low_res=jnp.zeros((2, 4, 4, 1)))
    assert out.shape == (2, 8, 8, 1)
    assert model.patch.kernel.shape[2] == 2  # image + low-res channels


def test_noise_augmentation_at_train_time(monkeypatch):
    seen = {}

    def spy_make_loss(graphdef, cfg, **kw):
        assert kw["cond_keys"] == ("low_res", "low_res_aug")

        def inner(params, model_state, batch, rng):
            seen.update(batch)
            return 0.0, ({}, model_state)

        return inner

    monkeypatch.setattr(superres_obj, "make_loss", spy_make_loss)
    cfg = SuperResObjectiveConfig(aug_min=0.2, aug_max=0.6)
    loss = make_sr_loss(None, cfg, num_classes=10)
    low = jnp.ones((64, 4, 4, 1)) * 0.5
    loss({}, {}, {"images": jnp.zeros((64, 8, 8, 1)), "low_res": low}, jax.random.key(1))
    level = np.asarray(seen["low_res_aug"])
    assert level.shape == (64,) and level.min() >= 0.2 and level.max() <= 0.6
    assert level.std() > 0.05  # a random level per example
    sched = cfg.make_schedule()
    a, s = np.asarray(sched.alpha(jnp.asarray(level))), np.asarray(sched.sigma(jnp.asarray(level)))
    eps = (np.asarray(seen["low_res"]) - a[:, None, None, None] * 0.5) / s[:, None, None, None]
    assert abs(eps.std() - 1.0) < 0.15  # noised by the schedule at that level
    np.testing.assert_allclose(augment(low, 0.0, jax.random.key(0), sched), low, atol=1e-6)


def test_fixed_level_at_sampling_and_labels_through_the_cascade(runs, monkeypatch):
    (sr_dir, sr_result), (base_dir, base_result) = runs
    calls = []
    real = cascade_lib.sample_model

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(cascade_lib, "sample_model", spy)
    sr = _stage(sr_config(str(sr_dir)), sr_result)
    base = _stage(base_config(str(base_dir)), base_result)
    labels = np.array([3, 1, 4, 1, 5], np.int32)
    high, low = cascade(base, sr, num=5, key=jax.random.key(0), labels=labels)
    assert high.shape == (5, 8, 8, 1) and low.shape == (5, 4, 4, 1)
    assert np.all(np.isfinite(np.asarray(high)))
    assert len(calls) == 2
    assert all(np.asarray(c["labels"]).tolist() == labels.tolist() for c in calls)
    assert "cond" not in calls[0] or calls[0]["cond"] is None
    np.testing.assert_allclose(calls[1]["cond"]["low_res_aug"], 0.2)  # the objective's sample_aug
    upsample(sr, low, key=jax.random.key(1), labels=labels, aug_level=0.35)
    np.testing.assert_allclose(calls[2]["cond"]["low_res_aug"], 0.35)
    # The conditioning the sampler got is the low-res image noised to that level.
    sched = schedules.make("cosine", 1000)
    a, s = float(sched.alpha(0.35)), float(sched.sigma(0.35))
    resid = (np.asarray(calls[2]["cond"]["low_res"]) - a * np.asarray(low)) / s
    assert 0.7 < resid.std() < 1.3


def test_cli_sample_and_eval_with_and_without_base(runs, tmp_path):
    (sr_dir, _), (base_dir, _) = runs
    out = tmp_path / "x.npz"
    args = [str(sr_dir), "--base", str(base_dir), "--num", "4", "--steps", "2", "--out", str(out)]
    assert sample_main(args) == 0
    data = np.load(out)
    assert data["images"].shape == (4, 8, 8, 1) and data["low_res"].shape == (4, 4, 4, 1)
    assert data["labels"].tolist() == [0, 1, 2, 3]
    assert sample_main([str(sr_dir), "--class", "7", "--out", str(tmp_path / "g.png")]) == 0
    assert eval_main([str(sr_dir), "--num", "20", "--steps", "2"]) == 0
    held_out = json.loads((sr_dir / "eval.json").read_text())
    assert held_out["low_res"] == "held-out" and set(held_out["naive"]) == {"bicubic", "nearest"}
    assert eval_main([str(sr_dir), "--base", str(base_dir), "--num", "20", "--steps", "2"]) == 0
    chained = json.loads((sr_dir / "eval.json").read_text())
    assert chained["low_res"] == "base" and chained["base_workdir"] == str(base_dir)
    assert 0.0 <= chained["accuracy"] <= 1.0 and chained["frechet"] > 0
    with pytest.raises(InputError, match="^--base: .*not a \\(base\\) diffusion run"):
        sample_main([str(sr_dir), "--base", str(sr_dir), "--out", str(out)])
    with pytest.raises(InputError, match="^--base: .*no super-resolution run"):
        sample_main([str(base_dir), "--base", str(base_dir), "--out", str(out)])
    with pytest.raises(InputError, match="^--aug-level: must be in"):
        sample_main([str(sr_dir), "--aug-level", "1.5", "--out", str(out)])


def test_mismatched_sizes_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="^low_res_size: 3 must divide image_size=8"):
        dataclasses.replace(SR_MODEL, low_res_size=3).validate()
    with pytest.raises(ConfigError, match="^low_res_size: 2 but low_res_channels=0"):
        dataclasses.replace(SR_MODEL, low_res_channels=0, low_res_size=2).validate()
    with pytest.raises(ConfigError, match="^low_res_size: 3 must divide image_size=8"):
        ImageDataConfig(image_size=8, low_res_size=3).validate()
    cfg = sr_config(str(tmp_path))
    with pytest.raises(
        ConfigError, match="^model.low_res_size: 4 differs from data.low_res_size=2"
    ):
        mlgen.config.load(
            dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, low_res_size=2))
        )
    with pytest.raises(ConfigError, match="^model.low_res_channels: the superres task needs"):
        mlgen.config.load(dataclasses.replace(cfg, model=PRESETS["unet-tiny"]))
    with pytest.raises(ConfigError, match="^model.low_res_channels: 1: a super-resolution"):
        mlgen.config.load(
            dataclasses.replace(base_config(str(tmp_path)), model=SR_MODEL, data=cfg.data)
        )
    with pytest.raises(ValueError, match="^model.low_res_size: the upsampler takes 4x4"):
        check_chain(SR_MODEL, SR_MODEL)
    model = UNet(SR_MODEL, rngs=nnx.Rngs(params=0))
    with pytest.raises(
        ValueError, match="^model.low_res_size / low_res_channels: .*got \\(8, 8, 1\\)"
    ):
        model(
            jnp.zeros((1, 8, 8, 1)),
            jnp.ones(1),
            jnp.zeros(1, jnp.int32),
            low_res=jnp.zeros((1, 8, 8, 1)),
        )
