"""``init_from``: a new run starts from another run's parameters (raw, not its EMA) or from a
Hugging Face model, with a fresh optimizer at step 0; mismatches and bad paths are one line."""

import jax
import numpy as np
import pytest

import mlgen
from mlgen import init_from, runs
from mlgen.config import ConfigError
from tests.helpers import replace, tiny_lm_config


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


def _start(cfg):
    """What ``mlgen.train`` builds before its first step, for a run with ``init_from``."""
    kind = init_from.check_source(cfg)
    return init_from.initial_state(runs.setup(cfg), kind)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained tiny run (4 steps) that keeps an EMA."""
    cfg = tiny_lm_config(str(tmp_path_factory.mktemp("src")), num_layers=1)
    cfg = replace(cfg, train=replace(cfg.train, num_steps=4, eval_every=0, ema_decay=0.5))
    return cfg, mlgen.train(cfg)


def test_fine_tune_from_a_run_starts_from_its_raw_params_fresh(source, tmp_path):
    src_cfg, src = source
    cfg = replace(src_cfg, workdir=str(tmp_path / "ft"), init_from=src_cfg.workdir, seed=1)
    cfg = replace(cfg, train=replace(cfg.train, ema_decay=0.0))
    state = _start(cfg)
    assert int(state["step"]) == 0
    assert _leaves_equal(state["params"], src.state["params"])  # bitwise, not the EMA
    assert not _leaves_equal(state["params"], src.state["ema"])
    moments = jax.tree.leaves(state["opt_state"])
    assert moments and all(not np.asarray(m).any() for m in moments)  # fresh: zeros, count 0
    assert not (tmp_path / "ft").exists()  # nothing written before training

    # Trained through the one loop: steps count from 0; resuming ignores init_from.
    short = replace(cfg, train=replace(cfg.train, num_steps=2, checkpoint_every=2))
    result = mlgen.train(short)
    assert [h["step"] for h in result.history] == [2]
    assert sorted(p.name for p in (tmp_path / "ft" / "checkpoints").iterdir()) == ["2"]
    # Once the run has its own checkpoint, init_from is ignored (even a path that is gone).
    assert init_from.check_source(replace(short, init_from=str(tmp_path / "deleted"))) is None


def test_model_mismatch_is_one_line_naming_the_field(source, tmp_path):
    src_cfg, _ = source
    cfg = tiny_lm_config(str(tmp_path / "ft"), num_layers=1, d_model=32)
    cfg = replace(cfg, init_from=src_cfg.workdir)
    with pytest.raises(ConfigError) as err:
        mlgen.train(cfg)
    msg = str(err.value)
    assert msg == f"model.d_model: init_from {src_cfg.workdir} has 64, the config has 32"
    assert not (tmp_path / "ft").exists()
    # The attention kernel and scan_layers may differ: same parameters.
    ok = replace(src_cfg, workdir=str(tmp_path / "ok"), init_from=src_cfg.workdir)
    ok = replace(ok, model=replace(ok.model, scan_layers=False))
    assert init_from.check_source(ok) == init_from.RUN


def test_missing_or_foreign_init_from_is_one_line(tmp_path):
    cfg = replace(tiny_lm_config(str(tmp_path / "run")), init_from=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"^init_from: no such directory .*nope'$"):
        mlgen.train(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^init_from: .* is neither a run directory"):
        mlgen.train(replace(cfg, init_from=str(tmp_path / "empty")))
    assert not (tmp_path / "run").exists()
