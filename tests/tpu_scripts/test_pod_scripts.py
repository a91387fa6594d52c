"""tpu_scripts/pod.sh: the commands each subcommand runs, read from --dry-run, and its errors.

Checked: the exact gcloud verbs and flags of create (TPU VM, queued resource, spot, multislice
node count/prefix, default runtime per generation), setup (every worker of every slice),
launch (the environment, MEGASCALE variables per slice, the workdir check), logs, stop and
delete, plus one-line argument errors (exit 2). Two tests run the script for real against a
fake ``gcloud`` that records its argv: the dry-run lines are exactly what runs, and setup's
tarball holds the checkout's files but not its ignored ones.

Not covered: real gcloud or a TPU. Nothing here checks that gcloud accepts these flags today
(they follow the gcloud reference), that the remote shell commands work on a TPU VM image
(uv, the venv, setsid/nohup, the pid file, the libtpu lock file), or that JAX forms one
multislice job from the MEGASCALE variables.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "tpu_scripts"
POD = SCRIPTS / "pod.sh"
ZONE = ("--zone", "us-east5-a")


def _pod(*args, env=None, script=POD):
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSDK_")}
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env={**base, **(env or {})}
    )


def _dry(*args, env=None):
    out = _pod("--dry-run", *args, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    return out.stdout.splitlines()


def _remote(line):
    """The --command a `gcloud ... ssh` line runs on the workers."""
    (cmd,) = [w[len("--command=") :] for w in shlex.split(line) if w.startswith("--command=")]
    return cmd


# ---- create ------------------------------------------------------------------------------


def test_create_tpu_vm():
    assert _dry("create", "pod1", *ZONE, "--accelerator", "v5p-128") == [
        "gcloud compute tpus tpu-vm create pod1 --zone=us-east5-a"
        " --accelerator-type=v5p-128 --version=v2-alpha-tpuv5"
    ]
    (line,) = _dry("create", "pod1", *ZONE, "--accelerator", "v4-32", "--preemptible")
    assert line.startswith("gcloud compute tpus tpu-vm create pod1 ")
    assert line.endswith(" --version=tpu-ubuntu2204-base --preemptible")


def test_create_queued_resource_on_spot_capacity():
    assert _dry("create", "pod1", *ZONE, "--accelerator", "v5p-128", "--queued", "--spot") == [
        "gcloud compute tpus queued-resources create pod1 --zone=us-east5-a"
        " --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --node-id=pod1 --spot"
    ]


def test_create_multislice_is_a_queued_resource_with_node_count_and_prefix():
    (line,) = _dry("create", "pod1", *ZONE, "--accelerator=v5p-128", "--num-slices=4", "--spot")
    assert line == (
        "gcloud compute tpus queued-resources create pod1 --zone=us-east5-a"
        " --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5"
        " --node-count=4 --node-prefix=pod1 --spot"
    )
    assert "--node-id" not in line


@pytest.mark.parametrize(
    "accelerator, version",
    [
        ("v4-8", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-64", "v2-alpha-tpuv5"),
        ("v6e-64", "v2-alpha-tpuv6e"),
    ],
)
def test_create_default_runtime_per_generation(accelerator, version):
    (line,) = _dry("create", "pod1", *ZONE, "--accelerator", accelerator)
    assert f" --version={version}" in line
    (line,) = _dry("create", "pod1", *ZONE, "--accelerator", accelerator, "--version", "mine")
    assert line.endswith(" --version=mine")


def test_project_and_zone_from_flags_or_environment():
    env = {"CLOUDSDK_CORE_PROJECT": "proj", "CLOUDSDK_COMPUTE_ZONE": "europe-west4-b"}
    (line,) = _dry("delete", "pod1", env=env)
    assert line == "gcloud compute tpus tpu-vm delete pod1 --zone=europe-west4-b --project=proj"
    (line,) = _dry("delete", "pod1", "--zone", "us-central2-b", "--project=p2", env=env)
    assert line == "gcloud compute tpus tpu-vm delete pod1 --zone=us-central2-b --project=p2"


def test_flags_before_or_after_the_subcommand():
    args = ("pod1", *ZONE, "configs/lm/tiny.py", "workdir=gs://b/run")
    first = _pod("--dry-run", "launch", *args)
    later = _pod("launch", *args, "--dry-run")
    assert first.returncode == later.returncode == 0
    assert first.stdout == later.stdout != ""


# ---- setup -------------------------------------------------------------------------------


def test_setup_copies_the_checkout_and_installs_on_every_worker():
    pack, scp, ssh = _dry("setup", "pod1", *ZONE)
    assert "git -C " in pack and "ls-files -z --cached --others --exclude-standard" in pack
    assert "| tar -czf " in pack
    assert scp.startswith("gcloud compute tpus tpu-vm scp ")
    assert scp.endswith(" pod1:~/mlgen.tar.gz --zone=us-east5-a --worker=all")
    assert ssh.startswith("gcloud compute tpus tpu-vm ssh pod1 --zone=us-east5-a --worker=all ")
    remote = _remote(ssh)
    assert "tar -xzf ~/mlgen.tar.gz -C ~/mlgen" in remote
    assert "uv venv -q --allow-existing --python 3.12 .venv" in remote
    assert remote.endswith('uv pip install -q -e ".[tpu]"')


def test_setup_clones_a_repo_on_every_slice_of_a_multislice():
    lines = _dry("setup", "pod1", *ZONE, "--num-slices", "2", "--repo", "https://x.org/m.git")
    assert [shlex.split(line)[:6] for line in lines] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1-0"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1-1"],
    ]
    for line in lines:
        assert "--worker=all" in line
        assert "git clone -q https://x.org/m.git ~/mlgen" in _remote(line)
        assert 'pip install -q -e ".[tpu]"' in _remote(line)


# ---- launch ------------------------------------------------------------------------------


def test_launch_runs_mlgen_train_in_the_background_on_every_worker():
    (ssh,) = _dry("launch", "pod1", *ZONE, "configs/lm/tiny.py", "workdir=gs://b/run", "a.b=1")
    assert ssh.startswith("gcloud compute tpus tpu-vm ssh pod1 --zone=us-east5-a --worker=all ")
    remote = _remote(ssh)
    assert "export MLGEN_DISTRIBUTED=1;" in remote
    assert "MEGASCALE" not in remote
    assert (
        "setsid nohup .venv/bin/mlgen train configs/lm/tiny.py workdir=gs://b/run a.b=1"
        " >> ~/mlgen-logs/pod1.log 2>&1 < /dev/null &"
    ) in remote
    assert remote.endswith("echo $! > ~/mlgen-logs/pod1.pid")
    assert "already running" in remote  # a second launch does not start a second run


def test_launch_multislice_sets_the_megascale_environment_per_slice():
    args = ("launch", "pod1", *ZONE, "--num-slices", "2", "cfg.py", "workdir=gs://b/r")
    describe, *ssh = _dry(*args, "--env", "XLA_FLAGS=--xla_dump_to=/tmp/x")
    assert describe == (
        "gcloud compute tpus tpu-vm describe pod1-0 --zone=us-east5-a"
        " --format='value(networkEndpoints[0].ipAddress)'"
    )
    assert len(ssh) == 2
    for i, line in enumerate(ssh):
        assert line.startswith(f"gcloud compute tpus tpu-vm ssh pod1-{i} --zone=us-east5-a ")
        assert "--worker=all" in line
        assert (
            "export MLGEN_DISTRIBUTED=1 MEGASCALE_COORDINATOR_ADDRESS=<ip-of-pod1-0-worker-0>:8081"
            f" MEGASCALE_NUM_SLICES=2 MEGASCALE_SLICE_ID={i} MEGASCALE_PORT=8081"
            " XLA_FLAGS=--xla_dump_to=/tmp/x;"
        ) in _remote(line)
    # a known coordinator needs no lookup
    lines = _dry(*args, "--coordinator", "10.1.2.3")
    assert len(lines) == 2 and "MEGASCALE_COORDINATOR_ADDRESS=10.1.2.3:8081" in lines[1]


@pytest.mark.parametrize(
    "flags, workdir",
    [
        (("--num-slices", "2"), "workdir=/tmp/run"),
        (("--accelerator", "v5p-64"), "workdir=/tmp/run"),
        (("--accelerator", "v5litepod-16"), "workdir=gs:/one-slash"),
        (("--accelerator", "v4-16"), None),  # the config's own workdir: unknown, so refused
    ],
)
def test_launch_refuses_a_local_workdir_on_a_multi_host_slice(flags, workdir):
    extra = (workdir,) if workdir else ()
    out = _pod("--dry-run", "launch", "pod1", *ZONE, *flags, "cfg.py", *extra)
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"pod.sh: {workdir or 'workdir=(not given)'}: a multi-host slice needs")
    assert "--allow-local-workdir" in line
    ok = _pod(
        "--dry-run", "launch", "pod1", *ZONE, *flags, "cfg.py", *extra, "--allow-local-workdir"
    )
    assert ok.returncode == 0, ok.stderr


def test_launch_without_an_accelerator_asks_gcloud_whether_the_slice_is_multi_host():
    out = _pod("--dry-run", "launch", "pod1", *ZONE, "cfg.py", "workdir=/tmp/run")
    assert out.returncode == 2  # under --dry-run the answer is unknown: taken as multi-host
    assert out.stdout.splitlines() == [
        "gcloud compute tpus tpu-vm describe pod1 --zone=us-east5-a"
        " --format='value(acceleratorType)'"
    ]


def test_launch_accepts_a_local_workdir_on_a_single_host():
    for accelerator in ("v5litepod-8", "v4-8", "v6e-8"):
        (line,) = _dry("launch", "pod1", *ZONE, "--accelerator", accelerator, "c.py", "workdir=/w")
        assert "mlgen train c.py workdir=/w >>" in _remote(line)


# ---- logs, stop, delete ------------------------------------------------------------------


def test_logs_tails_worker_0_or_every_worker():
    assert _dry("logs", "pod1", *ZONE) == [
        "gcloud compute tpus tpu-vm ssh pod1 --zone=us-east5-a --worker=0"
        " --command='tail -n 100 -F ~/mlgen-logs/pod1.log'"
    ]
    assert _dry("logs", "pod1", *ZONE, "--worker=all", "--no-follow", "--lines", "20") == [
        "gcloud compute tpus tpu-vm ssh pod1 --zone=us-east5-a --worker=all"
        " --command='tail -n 20 ~/mlgen-logs/pod1.log'"
    ]
    (line,) = _dry("logs", "pod1", *ZONE, "--num-slices", "2", "--slice", "1", "--worker", "3")
    assert line.startswith("gcloud compute tpus tpu-vm ssh pod1-1 --zone=us-east5-a --worker=3 ")


def test_stop_kills_the_run_on_every_worker_of_every_slice():
    lines = _dry("stop", "pod1", *ZONE, "--num-slices", "2")
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert line.startswith(f"gcloud compute tpus tpu-vm ssh pod1-{i} --zone=us-east5-a ")
        assert "--worker=all" in line
        remote = _remote(line)
        assert "p=$(cat ~/mlgen-logs/pod1.pid); kill -TERM -- -$p" in remote
        assert "kill -KILL -- -$p" in remote and "rm -f /tmp/libtpu_lockfile" in remote


def test_delete_tpu_vm_or_queued_resource():
    assert _dry("delete", "pod1", *ZONE) == [
        "gcloud compute tpus tpu-vm delete pod1 --zone=us-east5-a"
    ]
    assert _dry("delete", "pod1", *ZONE, "--quiet") == [
        "gcloud compute tpus tpu-vm delete pod1 --zone=us-east5-a --quiet"
    ]
    queued = ["gcloud compute tpus queued-resources delete pod1 --zone=us-east5-a --force --quiet"]
    assert _dry("delete", "pod1", *ZONE, "--queued", "--quiet") == queued
    assert _dry("delete", "pod1", *ZONE, "--num-slices", "2", "--quiet") == queued


# ---- errors and help ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, named",
    [
        ((), "SUBCOMMAND"),
        (("explode", "pod1"), "SUBCOMMAND"),
        (("create",), "NAME"),
        (("create", "Pod_1", *ZONE), "NAME"),
        (("create", "pod1", "--accelerator", "v5p-8"), "--zone"),
        (("create", "pod1", *ZONE), "--accelerator"),
        (("create", "pod1", *ZONE, "--accelerator", "tpu"), "--accelerator"),
        (("create", "pod1", *ZONE, "--accelerator", "v7x-8"), "--version"),
        (
            ("create", "pod1", *ZONE, "--accelerator", "v5p-8", "--queued", "--preemptible"),
            "--preemptible",
        ),
        (("create", "pod1", *ZONE, "--accelerator", "v5p-8", "--num-slices", "0"), "--num-slices"),
        (("create", "pod1", *ZONE, "--accelerator"), "--accelerator"),
        (("launch", "pod1", *ZONE), "CONFIG"),
        (("launch", "pod1", *ZONE, "cfg.py", "workdir"), "workdir"),
        (("launch", "pod1", *ZONE, "cfg.py", "--env", "1=2"), "--env"),
        (("logs", "pod1", *ZONE, "--worker", "first"), "--worker"),
        (("logs", "pod1", *ZONE, "--slice", "1"), "--slice"),
        (("logs", "pod1", *ZONE, "--spot"), "--spot"),
        (("stop", "pod1", "pod2", *ZONE), "pod2"),
        (("delete", "pod1", *ZONE, "--force"), "--force"),
    ],
)
def test_argument_errors_are_one_line_naming_the_argument(args, named):
    out = _pod("--dry-run", *args)
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"pod.sh: {named}:"), line


@pytest.mark.parametrize("command", ["create", "setup", "launch", "logs", "stop", "delete"])
def test_help_for_every_subcommand(command):
    out = _pod(command, "--help")
    assert out.returncode == 0 and out.stdout.startswith(f"usage: pod.sh {command} NAME")
    assert _pod("--help").stdout.startswith("usage: tpu_scripts/pod.sh SUBCOMMAND")


# ---- for real, against a fake gcloud -----------------------------------------------------


def _fake_gcloud(tmp_path):
    """A `gcloud` on PATH that appends its argv to calls.jsonl and answers `describe`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if 'describe' in sys.argv:\n"
        "    print('10.0.0.2')\n"
    )
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(log)}
    return env, lambda: [json.loads(line) for line in log.read_text().splitlines()]


def test_dry_run_prints_exactly_what_runs(tmp_path):
    env, calls = _fake_gcloud(tmp_path)
    args = ("launch", "pod1", *ZONE, "--num-slices", "2", "c.py", "workdir=gs://b/r", "m=a b")
    out = _pod(*args, env=env)
    assert out.returncode == 0, out.stderr
    printed = [
        shlex.split(line.replace("<ip-of-pod1-0-worker-0>", "10.0.0.2")) for line in _dry(*args)
    ]
    assert [["gcloud", *argv] for argv in calls()] == printed
    assert "MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2:8081" in printed[1][-1]
    assert "c.py workdir=gs://b/r 'm=a b' >>" in printed[1][-1]


def test_setup_packs_the_checkout_without_ignored_files(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(SCRIPTS, repo / "tpu_scripts")
    (repo / "pyproject.toml").write_text("[project]\n")
    (repo / ".gitignore").write_text(".venv/\n")
    (repo / ".venv").mkdir()
    (repo / ".venv" / "big").write_text("x")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    env, calls = _fake_gcloud(tmp_path)
    env["TMPDIR"] = str(tmp_path)
    out = _pod("setup", "pod1", *ZONE, env=env, script=repo / "tpu_scripts" / "pod.sh")
    assert out.returncode == 0, out.stderr
    tarball = tmp_path / "mlgen-pod1.tar.gz"
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", ".gitignore", "tpu_scripts/pod.sh", "tpu_scripts/common.sh"} <= names
    assert not any(n.startswith(".venv") for n in names)
    scp, ssh = calls()
    assert scp[:5] == ["compute", "tpus", "tpu-vm", "scp", str(tarball)]
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod1"] and "--worker=all" in ssh
