"""Checkpoints and workdirs: runs saved by older mlgen restore; remote workdirs reach orbax and
the filesystem as written; only process 0 writes logs."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import mlgen
from mlgen.train import checkpoint, trainer
from tests.data import fake_gcs
from tests.helpers import replace, tiny_lm_config

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_lm_run"


def test_a_run_saved_before_families_had_names_restores(tmp_path):
    """tests/fixtures/legacy_lm_run was written by mlgen at commit 11d9734 (config with import
    paths and flat attention fields, a train state without model_state): it restores onto
    today's code and its model gives the logits it gave then."""
    run_dir = tmp_path / "run"
    shutil.copytree(LEGACY, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["__class__"] == "mlgen.models.transformer:TransformerConfig"
    run = mlgen.restore(run_dir, devices=jax.devices()[:1])
    assert run.config.model.attention.backend == "auto" and run.state["model_state"] == {}
    assert int(run.state["step"]) == 2
    tok = jnp.asarray([[2, 100, 101, 102, 40, 41, 10, 32]], jnp.int32)
    np.testing.assert_allclose(
        run.model(ema=False)(tok), np.load(run_dir / "logits.npy"), atol=1e-5, rtol=0
    )


class _Manager:
    """Stands in for orbax's CheckpointManager: records the directory it was given."""

    directories: list = []

    def __init__(self, directory, options=None):
        self.directories.append(directory)
        self.steps = []

    def latest_step(self):
        return max(self.steps, default=None)

    def all_steps(self):
        return list(self.steps)

    def check_for_errors(self):
        pass

    def save(self, step, args, force=False):
        self.steps.append(step)
        return True

    def wait_until_finished(self):
        pass

    def close(self):
        pass


def test_a_gs_workdir_reaches_orbax_and_the_files_unmangled(monkeypatch):
    """``workdir=gs://bucket/run`` (what tpu_scripts/pod.sh tells users to pass): orbax gets
    ``gs://bucket/run/checkpoints`` and config.json / metrics.jsonl land in the bucket. GCS is
    an in-memory fake behind etils.epath and orbax's manager a recorder: what this does not
    cover is tensorstore writing arrays to a real bucket."""
    fs = fake_gcs.install(monkeypatch)
    _Manager.directories = []
    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", _Manager)
    cfg = tiny_lm_config("gs://bucket/run", num_layers=1, d_model=32)
    cfg = replace(cfg, train=replace(cfg.train, num_steps=4, eval_every=0))
    mlgen.train(cfg)
    assert [str(d) for d in _Manager.directories] == ["gs://bucket/run/checkpoints"]
    saved = json.loads(fs.cat("bucket/run/config.json"))
    assert saved["workdir"] == "gs://bucket/run" and saved["model"]["__class__"] == "transformer"
    lines = [json.loads(ln) for ln in fs.cat("bucket/run/metrics.jsonl").decode().splitlines()]
    assert [ln["step"] for ln in lines] == [2, 4]


def test_only_process_0_writes_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    log = trainer._Logger(checkpoint.workdir_path(tmp_path), 0, 10, progress=False)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tb").exists()


def test_local_workdirs_are_absolute_and_remote_ones_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(checkpoint.workdir_path("rel/run")) == str(tmp_path / "rel" / "run")
    assert str(checkpoint.workdir_path("gs://bucket/a/b")) == "gs://bucket/a/b"
    assert (
        tiny_lm_config("gs://b/r").validate().workdir == "gs://b/r"
    )  # nothing in the config mangles it


def test_one_process_writes_each_shard_from_one_replica_and_restores_exactly(tmp_path):
    """With one process, arrays are written from one replica (orbax's replica-parallel slicing
    only shares the writing between hosts). Replicated, sharded and partly replicated arrays
    on the 8 simulated devices come back equal, onto another sharding too. What this does not
    cover: several processes, which keep orbax's default (tests/train/test_multihost.py)."""
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    spec = jax.sharding.PartitionSpec
    shard = {
        "rep": spec(),
        "rows": spec(("data", "tensor")),
        "half": spec(None, "tensor"),
    }
    state = {
        k: jax.device_put(
            jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8) * (i + 1),
            jax.sharding.NamedSharding(mesh, p),
        )
        for i, (k, p) in enumerate(shard.items())
    }
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    handler = checkpoint.ocp.type_handlers.get_type_handler(jax.Array)
    assert handler._use_replica_parallel is False  # noqa: SLF001  (no public getter)
    assert ckpt.save(3, {"params": state})
    other = jax.sharding.NamedSharding(mesh, spec("tensor"))
    target = {
        "params": {k: jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=other) for k in state}
    }
    restored, _ = ckpt.restore(target)
    ckpt.close()
    for k, v in state.items():
        np.testing.assert_array_equal(np.asarray(restored["params"][k]), np.asarray(v))
        assert restored["params"][k].sharding == other
