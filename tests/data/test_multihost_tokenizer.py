"""With several JAX processes a tokenizer is trained once: process 0 trains, the others read it.

Two real processes on localhost form one JAX world (4 CPU devices each, gloo collectives),
the stand-in for two hosts sharing a workdir.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.data import data_corpus as corpus

_REPO = Path(__file__).resolve().parents[2]

# Each child prints one JSON line: did it train, and the model's pieces.
_CHILD = r"""
import dataclasses, faulthandler, json, sys
faulthandler.dump_traceback_later(60, exit=True)  # never outlive the test, whatever blocks
port, pid, glob, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)

from mlgen.data.text import TextDataConfig, get_tokenizer
from mlgen.data.tokenizer import Tokenizer

trained = []
_train = Tokenizer.train
Tokenizer.train = staticmethod(lambda *a, **k: trained.append(1) or _train(*a, **k))
cfg = TextDataConfig(source="files", paths=(glob,), tokenizer="bpe", vocab_size=300, max_docs=30)
tok = get_tokenizer(cfg, workdir)
out = {"process": jax.process_index(), "devices": jax.device_count(), "trained": len(trained),
       "pieces": [tok.id_to_piece(i) for i in range(tok.vocab_size)]}
cases = {  # every process fails (none hangs at the barrier) when it cannot get the model
    "unshared": (cfg, f"{workdir}_{pid}"),  # process 1 cannot see what process 0 wrote
    # process 0 raises
    "failed": (dataclasses.replace(cfg, paths=(glob + ".none",)), workdir + "_failed"),
}
for name, (c, w) in cases.items():
    try:
        get_tokenizer(c, w)
        out[name] = "ok"
    except ValueError as e:
        out[name] = str(e)
print(json.dumps(out), flush=True)
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_the_tokenizer_once(tmp_path):
    corpus.write_files(str(tmp_path), 40)
    workdir = tmp_path / "run"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")]),
    )
    env.pop("XLA_FLAGS", None)  # the test session's 8 simulated devices; each child has 4
    port = _free_port()
    (tmp_path / "logs").mkdir()
    logs = [(tmp_path / "logs" / f"out{i}", tmp_path / "logs" / f"err{i}") for i in range(2)]
    procs = []
    deadline = time.monotonic() + 90
    try:
        for i, (out, err) in enumerate(logs):
            # Files, not pipes: a child blocked on a full pipe would stall the other at a barrier.
            with open(out, "w") as fo, open(err, "w") as fe:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            _CHILD,
                            str(port),
                            str(i),
                            str(tmp_path / "*.txt"),
                            str(workdir),
                        ],
                        env=env,
                        cwd=str(tmp_path),
                        stdout=fo,
                        stderr=fe,
                    )
                )
        for p, (_, err) in zip(procs, logs):
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, err.read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = [json.loads(out.read_text().strip().splitlines()[-1]) for out, _ in logs]
    assert [o["process"] for o in outs] == [0, 1] and all(o["devices"] == 8 for o in outs)
    assert [o["trained"] for o in outs] == [1, 0]
    assert outs[0]["pieces"] == outs[1]["pieces"] and len(outs[0]["pieces"]) > 256
    assert [p.name for p in workdir.iterdir()] == ["tokenizer.model"]  # no temporary file left
    no_model = "workdir: process 1 finds no "
    assert outs[0]["unshared"] == "ok" and outs[1]["unshared"].startswith(no_model)
    assert outs[0]["failed"].startswith("paths: no files match") and outs[1]["failed"].startswith(
        no_model
    )
