"""tpu_scripts/pod.sh: the gcloud commands it would run (--dry-run; no cloud access here)."""

import subprocess


def _dry(*args):
    out = subprocess.run(
        ["bash", "tpu_scripts/pod.sh", "--dry-run", *args], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_launch_runs_mlgen_train_on_every_worker():
    out = _dry("launch", "pod1", "us-east5-a", "configs/lm/tiny.py", "workdir=gs://b/run")
    assert "--worker=all" in out and "mlgen train configs/lm/tiny.py workdir=gs://b/run" in out
    assert "MLGEN_DISTRIBUTED=1" in out


def test_create_and_setup():
    assert "--accelerator-type v5p-64" in _dry("create", "pod1", "us-east5-a", "v5p-64")
    out = _dry("setup", "pod1", "us-east5-a")
    assert "scp --recurse" in out and "pip install -q -e '.[tpu]'" in out


def test_unknown_command_fails():
    out = subprocess.run(
        ["bash", "tpu_scripts/pod.sh", "--dry-run", "explode", "a", "b"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
