"""A tiny VAE run and a latent diffusion run on its latents, through the one trainer: the VAE's
reconstruction error falls, it encodes / decodes (library and CLI), the scale factor makes the
latents unit-std, the latent denoiser's loss falls and its samples decode to images; a latent
run refuses another VAE than its own.

Slow (``-m slow``): two trainings, a sampler and the VAE's encode / decode compile, about 3.5
CPU-minutes (11 minutes of wall time on the shared 2-core machine). The fast checks of the same
pieces (objective, shapes, config errors, CLI errors) are in tests/models/test_vae.py,
tests/objectives/test_vae.py and tests/tasks/test_vae_task.py.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import mlgen
from mlgen import config as config_lib
from mlgen.cli import commands
from mlgen.config import ConfigError
from mlgen.data.images import load_arrays
from mlgen.tasks.latent import LATENT_FILE, LatentData, load_vae, scale_factor
from tests.tasks.test_vae_task import latent_config, vae_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("vae"))
    return workdir, mlgen.train(vae_config(workdir))


@pytest.fixture(scope="module")
def latent_run(vae_run, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("latent"))
    return workdir, mlgen.train(latent_config(workdir, vae_run[0]))


def _falls(history, key):
    values = [h[key] for h in history if key in h]
    assert len(values) >= 3 and np.all(np.isfinite(values)), values
    return values[-1] < values[0]


def test_vae_trains_through_the_one_loop(vae_run):
    workdir, result = vae_run
    assert _falls(result.history, "rec")
    final = result.final_metrics
    assert np.isfinite(final["kl"]) and final["kl"] >= 0
    assert {"eval_rec", "eval_kl", "eval_loss"} <= set(final)
    assert (Path(workdir) / "checkpoints" / "24").is_dir()
    assert (Path(workdir) / "samples" / "step_000024.png").is_file()
    assert (Path(workdir) / "loss.png").is_file()


def test_frozen_vae_encodes_and_decodes(vae_run):
    workdir, _ = vae_run
    vae = load_vae(workdir)
    assert vae.step == 24 and vae.latent_shape == (4, 4, 2)
    images, _ = load_arrays(vae.config.data, "validation")
    z = vae.encode(images[:10])
    assert z.shape == (10, 4, 4, 2) and np.all(np.isfinite(z))
    assert np.array_equal(z, vae.encode(images[:10]))  # the posterior mean: deterministic
    zs = vae.encode(images[:10], sample=True, key=jax.random.key(3))
    assert zs.shape == z.shape and not np.allclose(zs, z)
    x = vae.decode(z)
    assert x.shape == (10, 8, 8, 1) and x.min() >= -1.0 and x.max() <= 1.0
    # Round trip: nearer its own image than the average digit is.
    assert np.mean(np.abs(x - images[:10])) < np.mean(np.abs(images[:10] - images.mean(0)))
    with pytest.raises(ConfigError, match=r"^images: expected \[N, 8, 8, 1\]"):
        vae.encode(np.zeros((2, 16, 16, 1)))


def test_scale_factor_makes_the_latents_unit_std(vae_run):
    vae = load_vae(vae_run[0])
    latents = vae.encode(load_arrays(vae.config.data, "train")[0])
    s = scale_factor(latents)
    assert s > 0 and s != 1.0
    assert float(np.std(latents * s)) == pytest.approx(1.0, abs=1e-5)


def test_vae_cli_encodes_and_decodes(vae_run, tmp_path, capsys):
    workdir, _ = vae_run
    z_path, png, npz = tmp_path / "z.npz", tmp_path / "rec.png", tmp_path / "x.npz"
    argv = ["vae", "encode", workdir, "--out", str(z_path), "--split", "validation", "--num", "12"]
    assert commands.run(argv[0], argv[1:], usage="") == 0
    with np.load(z_path) as f:
        assert f["latents"].shape == (12, 4, 4, 2) and f["labels"].shape == (12,)
        assert float(np.std(f["latents"] * f["scale"])) == pytest.approx(1.0, abs=1e-5)
        assert int(f["vae_step"]) == 24
    assert commands.run("vae", ["decode", workdir, str(z_path), "--out", str(png)], usage="") == 0
    assert png.is_file()
    assert commands.run("vae", ["decode", workdir, str(z_path), "--out", str(npz)], usage="") == 0
    with np.load(npz) as f:
        assert f["images"].shape == (12, 8, 8, 1)
    capsys.readouterr()
    np.savez(tmp_path / "bad.npz", latents=np.zeros((3, 8, 8, 2), np.float32))
    bad = ["decode", workdir, str(tmp_path / "bad.npz"), "--out", str(png)]
    assert commands.run("vae", bad, usage="") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlgen vae: error: latents: ") and "[N, 4, 4, 2]" in err
    assert len(err.splitlines()) == 1
    missing = ["encode", str(tmp_path / "nope"), "--out", str(z_path)]
    assert commands.run("vae", missing, usage="") == 2
    assert capsys.readouterr().err.startswith("mlgen vae: error: workdir: no such directory")


def test_latent_diffusion_trains_and_samples_images(vae_run, latent_run, tmp_path):
    workdir, result = latent_run
    assert _falls(result.history, "loss")
    record = json.loads((Path(workdir) / LATENT_FILE).read_text())
    vae = load_vae(vae_run[0])
    want = scale_factor(vae.encode(load_arrays(vae.config.data, "train")[0]))
    assert record["vae"] == vae_run[0] and record["vae_step"] == 24
    assert record["scale"] == pytest.approx(want, rel=1e-6)
    assert record["latent_shape"] == [4, 4, 2]
    assert (Path(workdir) / "samples" / "step_000024.png").is_file()  # decoded grid
    out = tmp_path / "x.npz"
    assert commands.run("sample", [workdir, "--num", "4", "--out", str(out)], usage="") == 0
    with np.load(out) as f:
        images = f["images"]
    assert images.shape == (4, 8, 8, 1)  # the data's shape, not the latents'
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_a_latent_run_refuses_another_vae(latent_run, vae_run, tmp_path):
    """Resuming a latent run on another VAE would change what it learnt: refused when its data
    are built (before the first step)."""
    other = tmp_path / "other-vae"
    shutil.copytree(vae_run[0], other, ignore=shutil.ignore_patterns("trainer.lock"))
    saved = config_lib.load(str(Path(latent_run[0]) / "config.json"))
    moved = dataclasses.replace(saved, data=dataclasses.replace(saved.data, vae=str(other)))
    with pytest.raises(ConfigError, match=r"^data\.vae: .* but this run trains on the latents of"):
        LatentData(moved.validate()).record()
