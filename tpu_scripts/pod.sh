#!/usr/bin/env bash
# Create, set up and launch mlgen on every worker of a Cloud TPU pod slice.
#
#   tpu_scripts/pod.sh create  NAME ZONE ACCELERATOR [VERSION]   # e.g. v5p-64 v2-alpha-tpuv5
#   tpu_scripts/pod.sh setup   NAME ZONE                         # copy this repo, pip install on all workers
#   tpu_scripts/pod.sh launch  NAME ZONE CONFIG [key=value ...]  # mlgen train on all workers at once
#   tpu_scripts/pod.sh delete  NAME ZONE
#
# --dry-run (first argument) prints the gcloud commands instead of running them. Every worker
# runs the same `mlgen train`; JAX discovers the pod (jax.distributed) and each host reads only
# its shard of the data. Use a workdir on GCS or a shared disk (workdir=gs://bucket/run).
set -euo pipefail
DRY=""
if [[ "${1:-}" == "--dry-run" ]]; then DRY=echo; shift; fi
cmd=${1:?usage: pod.sh [--dry-run] create|setup|launch|delete NAME ZONE ...}; shift
name=${1:?NAME}; zone=${2:?ZONE}; shift 2
ssh_all() { $DRY gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }
case "$cmd" in
  create)
    acc=${1:?ACCELERATOR (e.g. v5p-64)}; version=${2:-v2-alpha-tpuv5}
    $DRY gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$acc" --version "$version" ;;
  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    $DRY gcloud compute tpus tpu-vm scp --recurse "$repo" "$name":~/mlgen --zone "$zone" --worker=all
    ssh_all "cd ~/mlgen && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'" ;;
  launch)
    config=${1:?CONFIG}; shift
    ssh_all "cd ~/mlgen && . .venv/bin/activate && MLGEN_DISTRIBUTED=1 mlgen train $config $*" ;;
  delete)
    $DRY gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
