"""The VAE task and latent diffusion without training: encode / decode of a frozen VAE, the
scale factor, the latent batch shapes, and every bad config or input as one line naming the
field, before anything compiles. (The trained runs: tests/tasks/test_latent_diffusion.py, slow.)

A "VAE run" here is a workdir with a checkpoint holding only its config and a step: what the
checks read. Its weights are never restored.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from mlgen import config as config_lib
from mlgen import sharding
from mlgen.cli import commands
from mlgen.config import Config, ConfigError, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.images import ImageDataConfig, load_arrays
from mlgen.models.family import family_of
from mlgen.models.unet import PRESETS as UNETS
from mlgen.models.vae import PRESETS as VAES
from mlgen.objectives.diffusion import DiffusionObjectiveConfig, SamplerConfig
from mlgen.objectives.vae import VAEObjectiveConfig
from mlgen.tasks import diffusion as diffusion_task
from mlgen.tasks.base import policy, rules_for
from mlgen.tasks.latent import FrozenVAE, scale_factor
from mlgen.train.checkpoint import Checkpointer

TRAIN = TrainConfig(
    num_steps=24,
    log_every=6,
    eval_every=24,
    eval_steps=1,
    checkpoint_every=24,
    progress_bar=False,
    async_checkpoints=False,
)


def vae_config(workdir: str) -> Config:
    return Config(
        task="vae",
        workdir=workdir,
        model=VAES["vae-tiny"],  # 8x8x1 -> 4x4x2
        data=ImageDataConfig(source="digits", image_size=8, batch_size=16),
        objective=VAEObjectiveConfig(reconstruction="l1", kl_weight=1e-3),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
        train=TRAIN,
    )


def latent_config(workdir: str, vae: str) -> Config:
    return Config(
        task="diffusion",
        workdir=workdir,
        model=dataclasses.replace(UNETS["unet-tiny"], image_size=4, in_channels=2, num_classes=10),
        data=ImageDataConfig(source="digits", image_size=8, batch_size=16, vae=vae),
        objective=DiffusionObjectiveConfig(
            prediction="v",
            sampling=SamplerConfig(steps=4, per_class=1, max_steps=8, clip=False),
        ),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
        train=TRAIN,
    )


def _fake_run(workdir, cfg: Config):
    """A checkpoint with ``cfg`` and a step counter only (what config checks read)."""
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(3, {"step": np.int32(3)}, config=dataclasses.replace(cfg, workdir=str(workdir)))
    ckpt.close()
    return str(workdir)


@pytest.fixture(scope="module")
def fake_vae(tmp_path_factory):
    return _fake_run(tmp_path_factory.mktemp("vae"), vae_config(""))


@pytest.fixture(scope="module")
def frozen():
    """A FrozenVAE of freshly initialised weights (no training) on all devices."""
    cfg = vae_config("/tmp/unused")
    family = family_of(cfg.model)
    mesh = sharding.make_mesh(cfg.mesh)
    rules = rules_for(cfg, family, dict(mesh.shape))
    with sharding.use(mesh, rules):
        model = family.build(cfg.model, nnx.Rngs(params=0), policy(cfg))
        graphdef, params = nnx.split(model, nnx.Param)
    return FrozenVAE(
        config=cfg,
        step=0,
        graphdef=graphdef,
        params=nnx.to_pure_dict(params),
        model_state={},
        mesh=mesh,
        rules=rules,
    )


def test_encode_decode_round_trip_shapes(frozen):
    images, _ = load_arrays(frozen.config.data, "validation")
    z = frozen.encode(images[:10])
    assert z.shape == (10, 4, 4, 2) and np.all(np.isfinite(z))
    assert np.array_equal(z, frozen.encode(images[:10]))  # the posterior mean: deterministic
    zs = frozen.encode(images[:10], sample=True, key=jax.random.key(3))
    assert zs.shape == z.shape and not np.allclose(zs, z)
    x = frozen.decode(z)
    assert x.shape == (10, 8, 8, 1) and x.min() >= -1.0 and x.max() <= 1.0
    with pytest.raises(ConfigError, match=r"^images: expected \[N, 8, 8, 1\] .* got \[2, 16"):
        frozen.encode(np.zeros((2, 16, 16, 1)))
    with pytest.raises(ConfigError, match=r"^latents: expected \[N, 4, 4, 2\]"):
        frozen.decode(np.zeros((2, 4, 4, 3)))


def test_scale_factor_makes_the_latents_unit_std(frozen):
    latents = frozen.encode(load_arrays(frozen.config.data, "train")[0])
    s = scale_factor(latents)
    assert s > 0 and abs(s - 1.0) > 1e-3
    assert float(np.std(latents * s)) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError, match=r"^data\.vae: .* constant"):
        scale_factor(np.ones((4, 2, 2, 1)))


def test_latent_batches_have_the_denoisers_shape(fake_vae, tmp_path):
    cfg = config_lib.load(latent_config(str(tmp_path / "run"), fake_vae))
    spec = diffusion_task._batch_spec(cfg)
    assert spec["images"][0] == (16, 4, 4, 2) and spec["labels"][0] == (16,)


def test_bad_latent_configs_are_one_line_naming_the_field(fake_vae, tmp_path):
    not_a_vae = _fake_run(tmp_path / "diffusion-run", latent_config("", ""))
    cfg = latent_config(str(tmp_path / "run"), fake_vae)
    assert config_lib.load(cfg) is not None
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["data.vae=" + str(tmp_path / "missing")], r"^data\.vae: no such directory"),
        (["data.vae=" + str(empty)], r"^data\.vae: .* holds no checkpoint"),
        (["data.vae=" + not_a_vae], r"^data\.vae: .* is a diffusion run of a unet, not a VAE"),
        (["model.image_size=8"], r"^model\.image_size: 8, but the VAE .* \(want 4\)"),
        (["model.in_channels=1"], r"^model\.in_channels: 1, but the VAE .* \(want 2\)"),
        (["data.image_size=16"], r"^data\.image_size: 16, but the VAE"),
        (["objective.sampling.clip=true"], r"^objective\.sampling\.clip: latents are not"),
    ]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            config_lib.load(cfg, overrides)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^data\.vae: the vae task trains on images"):
        config_lib.load(vae_config(str(tmp_path / "v")), [f"data.vae={fake_vae}"])
    with pytest.raises(ConfigError, match=r"^model\.image_size: 16 differs from data\.image_size"):
        config_lib.load(vae_config(str(tmp_path / "v")), ["model.image_size=16"])


def test_vae_cli_errors_are_one_line_before_restoring(fake_vae, tmp_path, capsys):
    png = str(tmp_path / "g.png")

    def err_of(*argv):
        assert commands.run("vae", list(argv), usage="") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    np.savez(tmp_path / "bad.npz", latents=np.zeros((3, 8, 8, 2), np.float32))
    np.savez(tmp_path / "other.npz", images=np.zeros((3, 8, 8, 1), np.float32))
    err = err_of("decode", fake_vae, str(tmp_path / "bad.npz"), "--out", png)
    assert err.startswith("mlgen vae: error: latents: ") and "[N, 4, 4, 2]" in err
    err = err_of("decode", fake_vae, str(tmp_path / "other.npz"), "--out", png)
    assert "holds no 'latents' array" in err
    err = err_of("decode", fake_vae, str(tmp_path / "none.npz"), "--out", png)
    assert "latents: no such file" in err
    err = err_of("encode", str(tmp_path / "nope"), "--out", str(tmp_path / "z.npz"))
    assert err.startswith("mlgen vae: error: workdir: no such directory")
    err = err_of("encode", fake_vae, "--out", str(tmp_path / "z.txt"))
    assert err.startswith("mlgen vae: error: --out: must end in .npz")
    err = err_of("encode", fake_vae, "--out", str(tmp_path / "z.npz"), "--step", "7")
    assert "has no checkpoint 7; saved: [3]" in err
    assert "invalid choice" in err_of("squash", fake_vae)
