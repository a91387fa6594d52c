"""``mlgen train`` on two processes is the run on one: same losses, one metrics log, a stop
signal to one process stopping both at the same step, resume.

Two real processes on localhost (4 CPU devices each, gloo collectives) form one 8-device JAX
world through the CLI's ``--coordinator/--num-processes/--process-id``, the stand-in for two
hosts sharing a workdir; the reference is one process with ``--cpu-devices 8``.

The data must be the same global batches on one and on two processes. Each host reads its
shard ``docs[host::hosts]`` and fills its rows from its own lanes, so with the shuffle off and
documents longer than the run (no lane needs a second one) the two hosts' rows together are
the one process's rows, permuted: the same loss up to the order of float sums. (With the
shuffle on, each host shuffles its own shard: a run on two hosts sees other batches than on
one.)
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from mlgen import distributed
from mlgen.cli import main
from mlgen.config import ConfigError
from mlgen.data.text import TextDataConfig, make_lm_data
from mlgen.train.checkpoint import Checkpointer

_REPO = Path(__file__).resolve().parents[2]
# What conftest gives the test session, less its 8 devices: the same in every child (one or two
# processes), so that their programs compile alike.
_XLA_FLAGS = "--xla_backend_optimization_level=0"
_VAL = 0.3  # of 40 documents: 11 for validation, 29 for training (16 lanes)
_TIMEOUT_S = 240  # per group of runs: a hang fails the test
_WORDS = (
    "the of and to in is it that for on with as was by at from this def class import "
    "return self value data model train step loss batch shard host"
).split()


def _corpus(root: Path, num_docs: int = 40, seed: int = 0) -> str:
    """``num_docs`` files of 400-900 bytes (every one outlasts the runs' rows), their glob."""
    rng = random.Random(seed)
    root.mkdir()
    for i in range(num_docs):
        n, parts = rng.randint(400, 900), []
        while sum(map(len, parts)) < n:
            parts.append(rng.choice(_WORDS) + rng.choice([" ", " ", " ", "\n", ", ", ". "]))
        (root / f"doc{i:03d}.txt").write_text("".join(parts))
    return str(root / "*.txt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLGEN_")}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=_XLA_FLAGS,  # not the session's (its 8 devices): each child sets its own
        PYTHONPATH=os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")]),
    )
    return env


def _mlgen(
    logs: Path, argvs: list[list[str]], timeout_s: float, poke=None
) -> list[tuple[int, str, str]]:
    """Runs ``python -m mlgen ARGV`` for each argv at once; (rc, stdout, stderr) of each.

    ``poke(procs)``, if given, is called every 20 ms while they run until it returns True (e.g.
    to signal one of them). A child still running after ``timeout_s`` (a hang at a barrier)
    fails the test: its whole process group is killed.
    """
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    deadline = time.monotonic() + timeout_s
    try:
        for i, argv in enumerate(argvs):
            out, err = logs / f"out{i}", logs / f"err{i}"
            files.append((out, err))
            # Files, not pipes: a child blocked on a full pipe would stall the other at a barrier.
            with open(out, "w") as fo, open(err, "w") as fe:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "mlgen", *argv],
                        env=_env(),
                        cwd=str(_REPO),
                        stdout=fo,
                        stderr=fe,
                        start_new_session=True,  # its own process group, killed as one
                    )
                )
        while poke is not None and time.monotonic() < deadline:
            if poke(procs) or all(p.poll() is not None for p in procs):
                break
            time.sleep(0.02)
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        hung = [i for i, p in enumerate(procs) if p.poll() is None]
        assert not hung, (
            f"processes {hung} still running after {timeout_s:.0f} s; stderr of the first: "
            + files[hung[0]][1].read_text()[-3000:]
        )
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [(p.returncode, o.read_text(), e.read_text()) for p, (o, e) in zip(procs, files)]


def _train_args(workdir: Path, data: str, steps: int) -> list[str]:
    return [
        "train",
        str(_REPO / "configs" / "lm" / "tiny.py"),
        f"workdir={workdir}",
        f"train.num_steps={steps}",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.eval_steps=100",  # a whole validation pass, at the end of each run
        f"data.val_fraction={_VAL}",
        "train.progress_bar=false",
        "optim.decay_steps=6",  # the same schedule whatever num_steps says
        "model.num_layers=1",
        "model.d_model=32",
        "data.seq_len=32",
        "data.source=files",
        f"data.paths={data}",
        "data.max_docs=0",
        "data.shuffle=false",
    ]


def _cache(tmp: Path) -> list[str]:
    # One compilation cache for the test's runs: the resumed run compiles nothing new.
    return ["--compilation-cache", str(tmp / "jax-cache")]


def _lines(workdir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


def _world(tmp: Path, args: list[str]) -> list[list[str]]:
    """The argvs of two processes on localhost, 4 CPU devices each, running ``args``."""
    world = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    return [
        [*_cache(tmp), "--cpu-devices", "4", *world, "--process-id", str(i), *args] for i in (0, 1)
    ]


def _passes(data: str) -> list[int]:
    """Batches in each of the two hosts' validation passes."""
    cfg = TextDataConfig(
        source="files", paths=(data,), seq_len=32, batch_size=16, val_fraction=_VAL, shuffle=False
    )
    return [
        sum(
            1
            for _ in make_lm_data(cfg, split="validation", seed=0, process_index=i, process_count=2)
        )
        for i in (0, 1)
    ]


def test_two_processes_train_stop_on_one_signal_and_resume_as_one(tmp_path):
    """Two processes train as one; a SIGTERM to process 1 only stops both after the same step,
    which both save (each its data iterator) and exit 0; the resumed run's losses are the
    one-process run's."""
    # Eval steps are collectives: hosts whose validation passes differ in length must still
    # run as many (they hung before). A corpus whose two hosts' passes differ (the first of a
    # few seeds; in one full-suite run seed 0 gave both hosts 11 batches).
    for seed in range(8):
        data = _corpus(tmp_path / f"corpus{seed}", seed=seed)
        if len(set(_passes(data))) == 2:
            break
    assert len(set(_passes(data))) == 2
    one, two = tmp_path / "one", tmp_path / "two"
    steps = 12  # the documents outlast 12 rows of 32 tokens per lane
    t0 = time.monotonic()
    signalled: list[int] = []

    def sigterm_process_1(procs) -> bool:
        # Once process 0 has logged step 2: SIGTERM to process 1 only (procs: ref, p0, p1).
        metrics = two / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            procs[2].send_signal(signal.SIGTERM)
            signalled.append(len(metrics.read_text().splitlines()))
            return True
        return False

    # The reference (one process, 8 devices) beside the two-process run, stopped by the signal.
    sync = ["train.preemption_sync_every=1"]  # agree after every step (default 10)
    ref, *first = _mlgen(
        tmp_path / "logs" / "first",
        [[*_cache(tmp_path), "--cpu-devices", "8", *_train_args(one, data, steps)]]
        + _world(tmp_path, [*_train_args(two, data, steps), *sync]),
        _TIMEOUT_S,
        poke=sigterm_process_1,
    )
    for name, (rc, _, err) in zip(["one process", "process 0", "process 1"], [ref, *first]):
        assert rc == 0, f"{name}: exit {rc}\n{err[-3000:]}"
    assert signalled, "the two-process run ended before process 0 logged step 2"
    expected = {r["step"]: r["loss"] for r in _lines(one)}
    assert sorted(expected) == list(range(1, steps + 1))
    said = [[ln for ln in err.splitlines() if "stopped after step" in ln] for _, _, err in first]
    assert all(len(lines) == 1 for lines in said), said
    assert "another process's signal" in said[0][0] and "SIGTERM" in said[1][0], said
    k = int(said[0][0].split("stopped after step ")[1].split()[0])
    assert k == int(said[1][0].split("stopped after step ")[1].split()[0])  # the same step
    assert signalled[0] <= k < steps, (signalled, k)
    before = (two / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in before] == list(range(1, k + 1))  # process 0's
    assert (two / "checkpoints" / str(k) / "data_1").is_dir()  # both processes' data iterators
    for _, out, _ in first:
        assert "done: step" not in out  # stopped, not finished
    t1 = time.monotonic()

    resumed = _mlgen(
        tmp_path / "logs" / "resumed", _world(tmp_path, _train_args(two, data, steps)), _TIMEOUT_S
    )
    for i, (rc, _, err) in enumerate(resumed):
        assert rc == 0, f"resumed process {i}: exit {rc}\n{err[-3000:]}"
    after = (two / "metrics.jsonl").read_text().splitlines()
    assert after[:k] == before  # kept as they were: the resumed run started at step k + 1
    got = {r["step"]: r["loss"] for r in _lines(two)}
    assert list(got) == list(range(1, steps + 1))  # one line per step: none from process 1
    diff = max(abs(got[s] - expected[s]) for s in expected)
    print(f"stopped after step {k}; max |loss(2 processes) - loss(1 process)| = {diff:.3g}")
    assert diff <= 1e-5, (got, expected)
    assert "eval_loss" in _lines(two)[steps - 1]  # a stopped run does not evaluate
    for _, out, _ in resumed:
        assert "done: step" in out
    t2 = time.monotonic()
    print(f"wall: reference + first run {t1 - t0:.1f} s, resumed {t2 - t1:.1f} s")


@pytest.mark.parametrize(
    "argv, error",
    [
        (["--coordinator", "127.0.0.1:1234"], "--num-processes: --coordinator needs"),
        (
            ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
            "--process-id: must be < --num-processes 2, got 2",
        ),
        (["--num-processes", "2", "--process-id", "0"], "--coordinator: --num-processes needs"),
        (["--coordinator", "localhost", "--num-processes", "1", "--process-id", "0"], "HOST:PORT"),
        (["--num-processes", "two"], "--num-processes: must be an integer, got 'two'"),
        (["--distributed", "--num-processes", "0"], "--num-processes: must be >= 1, got 0"),
    ],
)
def test_bad_world_options_are_one_line_errors(argv, error, capsys):
    assert main([*argv, "train", "configs/lm/tiny.py"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlgen: ") and error in err and err.count("\n") == 1, err


def test_bad_world_options_exit_2_before_jax_starts(tmp_path):
    env = dict(_env(), MLGEN_COORDINATOR="127.0.0.1:1234", MLGEN_NUM_PROCESSES="2")
    p = subprocess.run(
        [sys.executable, "-m", "mlgen", "train", "configs/lm/tiny.py"],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr == "mlgen: --process-id: --coordinator needs --process-id too\n"


def test_python_names_in_errors_and_nothing_to_join():
    with pytest.raises(ConfigError, match=r"^num_processes: coordinator needs num_processes and "):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ConfigError, match=r"^process_id: must be >= 0, got -1$"):
        distributed.initialize(process_id=-1)
    assert distributed.initialize() is False  # one process: JAX untouched


def test_data_states_of_another_process_count_are_not_restored(tmp_path, caplog):
    state = {"params": {"w": jnp.arange(4.0)}}
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(2, state, data_state={"lanes": [[0, 1]]}, force=True)
    ckpt.close()
    assert [p.name for p in (tmp_path / "checkpoints" / "2").glob("data_*")] == ["data_0"]
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    ckpt = Checkpointer(tmp_path, async_save=False)
    assert ckpt.restore(target)[1] == {"lanes": [[0, 1]]}
    # As if two processes had saved it: one process cannot take over their two iterators.
    where = tmp_path / "checkpoints" / "2"
    shutil.copytree(where / "data_0", where / "data_1")
    with caplog.at_level("WARNING", logger="mlgen"):
        restored, data = ckpt.restore(target)
    ckpt.close()
    assert data is None and float(restored["params"]["w"][3]) == 3.0
    assert "data-iterator states of 2 processes, not 1" in caplog.text
