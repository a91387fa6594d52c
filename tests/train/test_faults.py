"""The trainer never loses work: preemption, divergence, bad checkpoints, a changed model, a
second trainer, a full disk, a failing hook. Each test breaks one thing and checks the one line
the user gets and what is left on disk."""

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.serialization import serialization

import mlgen
from mlgen.cli import commands
from mlgen.train import checkpoint, trainer
from mlgen.train.errors import CheckpointWriteError, Diverged, WorkdirLocked
from mlgen.train.lock import LOCK_NAME
from tests.helpers import replace, tiny_lm_config

_REPO = Path(__file__).resolve().parents[2]


def _cfg(workdir, num_steps=4, **train):
    cfg = tiny_lm_config(str(workdir), num_layers=1, d_model=32)
    t = {"log_every": 1, "eval_every": 0, "checkpoint_every": 2, **train, "num_steps": num_steps}
    return replace(cfg, train=replace(cfg.train, **t))


def _lines(workdir) -> list[dict]:
    return [json.loads(ln) for ln in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _steps(workdir) -> list[int]:
    return sorted(
        int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()
    )


def _said(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints 2 and 4 (copied by each test that breaks it)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    mlgen.train(_cfg(workdir))
    assert _steps(workdir) == [2, 4]
    return workdir


def _copy(trained, tmp_path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


# ----------------------------------------------------------------------------- preemption
def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLGEN_")}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_backend_optimization_level=0",
        PYTHONPATH=os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")]),
    )
    return env


def _train_cli(tmp_path: Path, workdir: Path, num_steps: int, log: str) -> subprocess.Popen:
    argv = [
        *("--cpu-devices", "2", "--compilation-cache", str(tmp_path / "jax-cache"), "train"),
        str(_REPO / "configs" / "lm" / "tiny.py"),
        f"workdir={workdir}",
        f"train.num_steps={num_steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_steps=1",
        "train.checkpoint_every=1000",
        "train.progress_bar=false",
        "optim.decay_steps=50",  # the same schedule whatever num_steps says
        "model.num_layers=1",
        "model.d_model=32",
        "data.max_docs=20",
        "data.batch_size=4",
        "data.seq_len=32",
    ]
    out = open(tmp_path / f"{log}.err", "w")  # a file, not a pipe: the child never blocks on it
    return subprocess.Popen(
        [sys.executable, "-m", "mlgen", *argv],
        env=_env(),
        cwd=str(_REPO),
        stdout=subprocess.DEVNULL,
        stderr=out,
        start_new_session=True,
    )


def _finish(p: subprocess.Popen, timeout: float = 240) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise


def test_sigterm_saves_the_step_exits_0_and_the_resumed_run_is_the_uninterrupted_one(tmp_path):
    """A real ``mlgen train`` process gets a real SIGTERM mid-run: it finishes the step, saves
    it (data-iterator state included), says so in one line and exits 0; rerunning to a few
    steps later gives the losses of a run never interrupted, bitwise."""
    a, b = tmp_path / "a", tmp_path / "b"
    p = _train_cli(tmp_path, a, 100_000, "a")
    deadline = time.monotonic() + 240
    while p.poll() is None and time.monotonic() < deadline:
        if (a / "metrics.jsonl").exists() and len(_lines(a)) >= 3:
            break
        time.sleep(0.05)
    assert p.poll() is None, (tmp_path / "a.err").read_text()[-3000:]
    p.send_signal(signal.SIGTERM)
    assert _finish(p, 120) == 0, (tmp_path / "a.err").read_text()[-3000:]
    err = (tmp_path / "a.err").read_text()
    said = [ln for ln in err.splitlines() if "SIGTERM" in ln]
    assert len(said) == 1 and "Traceback" not in err, err[-3000:]
    k = int(said[0].split("stopped after step ")[1].split()[0])
    assert 3 <= k < 100_000 and _steps(a) == [k]  # the preemption's checkpoint, only
    assert [r["step"] for r in _lines(a)] == list(range(1, k + 1))
    assert not (a / LOCK_NAME).exists()

    resumed, straight = (
        _train_cli(tmp_path, a, k + 3, "resumed"),
        _train_cli(tmp_path, b, k + 3, "b"),
    )
    assert _finish(resumed) == 0, (tmp_path / "resumed.err").read_text()[-3000:]
    assert _finish(straight) == 0, (tmp_path / "b.err").read_text()[-3000:]
    got, want = _lines(a), _lines(b)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, k + 4))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


def test_the_first_signal_is_noted_the_handlers_come_back_and_a_second_exits_at_once(tmp_path):
    script = """
import os, signal
from mlgen.train.preemption import Preemption
before = signal.getsignal(signal.SIGINT)
with Preemption() as p:
    os.kill(os.getpid(), signal.SIGINT)
    print("noted", p.requested(1), p.name, flush=True)
print("restored", signal.getsignal(signal.SIGINT) is before, flush=True)
with Preemption():
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    print("still here", flush=True)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert out.stdout == "noted True SIGINT\nrestored True\n", out.stderr[-3000:]
    assert out.returncode == 128 + signal.SIGTERM
    assert out.stderr == "mlgen: second SIGTERM: exiting now, without saving\n"


# ----------------------------------------------------------------------------- divergence
def test_non_finite_steps_are_skipped_and_the_run_stops_after_max_bad_steps(tmp_path, caplog):
    cfg = _cfg(tmp_path, num_steps=40, max_bad_steps=3)
    cfg = replace(cfg, optim=replace(cfg.optim, lr=1e6))  # diverges within a few steps
    with pytest.raises(Diverged) as e, caplog.at_level(logging.WARNING):
        mlgen.train(cfg)
    msg = str(e.value)
    assert msg.startswith("train.max_bad_steps: 3 steps in a row") and "\n" not in msg, msg
    lines = _lines(tmp_path)
    bad = [r["step"] for r in lines if r["skipped"]]
    assert len(bad) >= 3 and bad == list(range(bad[0], bad[0] + len(bad)))
    assert f"steps {bad[0]}-{bad[0] + 2}" in msg
    latest = _steps(tmp_path)[-1]
    assert f"the last good checkpoint is step {latest} in" in msg
    assert latest <= lines[-1]["step"] < 40
    run = mlgen.restore(tmp_path)  # the last good checkpoint restores, and is finite
    assert int(run.state["step"]) == latest and trainer.all_finite(run.state)
    assert not _said(caplog, "NaN or Inf")  # TensorBoard is not given the skipped steps' NaN


def test_a_state_gone_non_finite_is_never_checkpointed(tmp_path):
    """A task's own step without the guard: the NaN state is refused at the save."""
    s = mlgen.setup(_cfg(tmp_path, num_steps=4))
    inner = s.train_step.make

    def poisoned(graphdef):
        step = inner(graphdef)

        def run(state, batch, rng):
            state, metrics = step(state, batch, rng)
            bad = jax.tree.map(lambda x: x * np.nan, state["params"])
            return dict(state, params=bad), {k: v for k, v in metrics.items() if k != "skipped"}

        return run

    s.train_step = dataclasses.replace(s.train_step, make=poisoned)
    with pytest.raises(Diverged, match=r"^train: the train state is not finite after step 2 "):
        trainer.fit(s)
    assert not (tmp_path / "checkpoints").exists() or _steps(tmp_path) == []


# ----------------------------------------------------------------------------- checkpoints
def _truncate_a_data_file(ckpt: Path):
    data = max((ckpt / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:10])


def _empty_data_0(ckpt: Path):
    for p in (ckpt / "data_0").iterdir():
        p.unlink()


def _remove_state(ckpt: Path):
    shutil.rmtree(ckpt / "state")


@pytest.mark.parametrize("corrupt", [_truncate_a_data_file, _empty_data_0, _remove_state])
def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_previous_one_used(
    trained, tmp_path, caplog, corrupt
):
    workdir = _copy(trained, tmp_path)
    corrupt(workdir / "checkpoints" / "4")
    (workdir / "checkpoints" / "6.orbax-checkpoint-tmp").mkdir()  # an interrupted save's
    with caplog.at_level(logging.WARNING, logger="mlgen"):
        mlgen.train(_cfg(workdir, num_steps=6))
    said = _said(caplog, "checkpoint 4 is unusable")
    assert len(said) == 1 and said[0].endswith(
        f"moved to {workdir / 'checkpoints' / 'corrupt' / '4'}; trying checkpoint 2"
    ), said
    assert (workdir / "checkpoints" / "corrupt" / "4").is_dir()
    assert _steps(workdir) == [2, 4, 6]
    lines = _lines(workdir)
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]  # resumed at 2: 3 and 4 again
    assert [r["loss"] for r in lines[:4]] == [r["loss"] for r in _lines(trained)]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # orbax's held back


def test_a_non_finite_checkpoint_is_not_resumed_from_and_a_fitting_change_resumes(
    trained, tmp_path, caplog
):
    """What an mlgen before the divergence guard could leave: NaN in the latest checkpoint. The
    rerun, with another attention backend (a model field that changes no shape), resumes from
    the one before, saying what changed."""
    workdir = _copy(trained, tmp_path)
    s = mlgen.setup(_cfg(workdir), abstract=True)
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    _, state, _ = ckpt.restore_good(s.state, with_data=False)
    nan = dict(state, params=jax.tree.map(lambda x: x * np.nan, state["params"]))
    ckpt.save(6, nan, config=s.config, force=True)
    ckpt.close()
    cfg = _cfg(workdir, num_steps=6)
    cfg = replace(cfg, model=replace(cfg.model, attention=mlgen.AttentionConfig(backend="xla")))
    with caplog.at_level(logging.WARNING, logger="mlgen"):
        result = mlgen.train(cfg)
    said = _said(caplog, "checkpoint 6 is unusable (its state holds NaN or infinite values)")
    assert len(said) == 1 and said[0].endswith("trying checkpoint 4"), said
    assert _said(
        caplog, "checkpoint 4: resuming with model.attention.backend ('reference' -> 'xla')"
    )
    assert [r["step"] for r in _lines(workdir)] == [1, 2, 3, 4, 5, 6]
    assert trainer.all_finite(result.state) and _steps(workdir) == [2, 4, 6]


@pytest.mark.parametrize(
    "override, error",
    [
        ("model.d_model=64", "model.d_model: checkpoint 4 in {} has 32, the config has 64; "),
        ("model.flavour=gpt2", "model.flavour: checkpoint 4 in {} has 'llama', the config has "),
    ],
)
def test_a_changed_model_is_one_line_naming_the_field(trained, tmp_path, capsys, override, error):
    workdir = _copy(trained, tmp_path)
    argv = [
        str(_REPO / "configs" / "lm" / "tiny.py"),
        f"workdir={workdir}",
        "model.num_layers=1",
        "model.d_model=32",
        "model.attention.backend=reference",
        "data.seq_len=32",
        "data.batch_size=8",
        "data.max_docs=40",
        "train.progress_bar=false",
        override,
    ]
    assert commands.run("train", argv, usage="") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "mlgen: " + error.format(workdir / "checkpoints")
    )
    assert "a new workdir" in err and "init_from=" in err
    assert _steps(workdir) == [2, 4]  # untouched


# ----------------------------------------------------------------------------- workdir lock
def test_a_second_trainer_refuses_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        lock = tmp_path / LOCK_NAME
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": 0}))
        with pytest.raises(WorkdirLocked) as e:
            mlgen.train(_cfg(tmp_path, num_steps=2))
        assert str(e.value).startswith(
            f"workdir: {tmp_path} is in use by process {holder.pid} on this host"
        ), e.value
        assert not (tmp_path / "checkpoints").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="mlgen"):
        mlgen.train(_cfg(tmp_path, num_steps=2))
    assert _said(caplog, f"taking over the lock of process {holder.pid}, which is gone")
    assert _steps(tmp_path) == [2] and not lock.exists()  # released at the end


def test_a_lock_held_from_another_host_names_the_file(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": 1234, "host": "elsewhere", "since": 0}))
    with pytest.raises(WorkdirLocked, match=f"on host elsewhere .*delete {lock}$"):
        mlgen.train(_cfg(tmp_path, num_steps=2))


# ----------------------------------------------------------------------------- full disk, hooks
def test_a_full_disk_is_one_line_per_lost_save_and_the_previous_checkpoint_survives(
    tmp_path, monkeypatch, caplog
):
    """Orbax's async writer fails from step 4 on (ENOSPC in its background thread, where
    tensorstore writes the arrays): one warning per lost checkpoint, a one-line error for the
    final one, checkpoint 2 intact; with the space back, the rerun resumes from 2."""
    write = serialization.async_serialize_from_host

    async def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    save = checkpoint.Checkpointer.save

    def filling(self, step, *args, **kwargs):
        if step >= 4:
            monkeypatch.setattr(serialization, "async_serialize_from_host", full)
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", filling)
    cfg = _cfg(tmp_path, num_steps=6, async_checkpoints=True)
    with pytest.raises(CheckpointWriteError) as e, caplog.at_level(logging.INFO):
        mlgen.train(cfg)
    assert str(e.value) == (
        "checkpoint: step 6 was not written (OSError: [Errno 28] No space left on device); the "
        f"latest complete checkpoint is step 2 in {tmp_path / 'checkpoints'}"
    )
    lost = [r.getMessage() for r in caplog.records if "was not written" in r.getMessage()]
    assert lost == [
        f"checkpoint {n} was not written (OSError: [Errno 28] No space left on device); the "
        "latest complete checkpoint is step 2"
        for n in (4, 6)
    ]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert _steps(tmp_path) == [2]

    monkeypatch.setattr(serialization, "async_serialize_from_host", write)
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    mlgen.train(cfg)
    assert _steps(tmp_path) == [2, 4, 6] and [r["step"] for r in _lines(tmp_path)] == list(
        range(1, 7)
    )


def test_a_failing_hook_costs_no_checkpoint_and_a_signal_from_python_returns_preempted(
    tmp_path, caplog
):
    """The loss-plot hook raises (no matplotlib) at step 2: one warning, checkpoint 2 written.
    SIGTERM while batch 5 is read: ``fit`` finishes step 5, saves it and returns a result
    marked preempted, with the previous signal handler back."""

    def loss_plot(step, state, graphdef, workdir):
        raise ModuleNotFoundError("No module named 'matplotlib'")

    s = mlgen.setup(_cfg(tmp_path, num_steps=8, eval_every=2, checkpoint_every=2))
    make_data = s.task.train_data

    def data():
        it, n = make_data(), [0]

        class Signalling:
            def __next__(self):
                n[0] += 1
                if n[0] == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                return next(it)

            def get_state(self):
                return it.get_state()

            def set_state(self, state):
                it.set_state(state)

        return Signalling()

    s.task = dataclasses.replace(s.task, hooks=(loss_plot,), train_data=data)
    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.WARNING, logger="mlgen"):
        result = trainer.fit(s)
    assert _said(caplog, "hook loss_plot failed") == [
        f"hook loss_plot failed at step {n} (ModuleNotFoundError: No module named 'matplotlib'); "
        "training goes on"
        for n in (2, 4)
    ]
    assert result.preempted and result.final_metrics["step"] == 5
    assert _steps(tmp_path) == [2, 4, 5] and signal.getsignal(signal.SIGTERM) is before
    assert _said(caplog, "SIGTERM: stopped after step 5 and saved it in")
