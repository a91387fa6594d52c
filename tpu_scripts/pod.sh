#!/usr/bin/env bash
# Run mlgen on a Cloud TPU VM, a pod slice, or a multislice queued resource, from your machine.
# `pod.sh --help` lists the subcommands, `pod.sh SUBCOMMAND --help` each one's flags. Every
# subcommand takes --dry-run, which prints the commands (gcloud, one per line) instead of
# running them. The README's "Running on a TPU pod" walks through a whole run.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exec 3>&1  # capture() prints dry-run commands here from inside $(...)

USAGE="usage: tpu_scripts/pod.sh SUBCOMMAND NAME [flags]   (flags may come anywhere)

subcommands:
  create NAME --accelerator TYPE   a TPU VM, or a queued resource (--queued, --num-slices N)
  setup  NAME                      copy this repo (or --repo URL) to every worker, pip install
  launch NAME CONFIG [key=value..] mlgen train on every worker of every slice, in the background
  logs   NAME                      tail worker 0's log (--worker=all: every worker's)
  stop   NAME                      stop the training processes on every worker
  delete NAME                      delete the TPU VM, or the queued resource (--queued)

flags every subcommand takes:
  --zone ZONE        or CLOUDSDK_COMPUTE_ZONE (required)
  --project PROJECT  or CLOUDSDK_CORE_PROJECT (default: gcloud's configured project)
  --num-slices N     the pod is a multislice queued resource of N slices (NAME-0 ...)
  --dry-run          print the commands instead of running them
  -h, --help         this, or a subcommand's flags

example (a 2-slice v5p-128 on spot capacity):
  tpu_scripts/pod.sh create run1 --zone us-east5-a --accelerator v5p-128 --num-slices 2 --spot
  tpu_scripts/pod.sh setup  run1 --zone us-east5-a --num-slices 2
  tpu_scripts/pod.sh launch run1 --zone us-east5-a --num-slices 2 configs/lm/small.py workdir=gs://b/run1"

help_of() {  # help_of SUBCOMMAND: its usage
  case "$1" in
    create) echo "usage: pod.sh create NAME --accelerator TYPE [--version V] [--queued] [--spot | --preemptible]
                     [--num-slices N] [--zone ZONE] [--project P] [--dry-run]

  --accelerator TYPE   e.g. v4-32, v5litepod-16, v5p-128, v6e-64 (alias --accelerator-type)
  --version V          TPU runtime (alias --runtime-version); default per generation: v4
                       tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                       v6e v2-alpha-tpuv6e
  --queued             a queued resource (gcloud compute tpus queued-resources create) instead of
                       a TPU VM (tpu-vm create): it waits for capacity instead of failing
  --num-slices N       N > 1: a multislice queued resource, slices NAME-0 ... NAME-(N-1)
  --spot               spot capacity (cheap, preemptible at any time); best with --queued
  --preemptible        the older preemptible TPU VM (not with --queued)" ;;
    setup) echo "usage: pod.sh setup NAME [--repo URL] [--python VERSION] [--num-slices N] [--zone ZONE]
                    [--project P] [--dry-run]

On every worker of every slice: this checkout (its tracked and untracked, not ignored files)
or a git clone of --repo URL goes to ~/mlgen, then a venv ~/mlgen/.venv made by uv with
Python VERSION (default 3.12; TPU VM images ship Python 3.10, mlgen needs >= 3.11) gets
pip install -e '.[tpu]'." ;;
    launch) echo "usage: pod.sh launch NAME CONFIG [key=value ...] [--num-slices N] [--accelerator TYPE]
                     [--allow-local-workdir] [--coordinator IP] [--env KEY=VALUE ...]
                     [--zone ZONE] [--project P] [--dry-run]

Starts 'mlgen train CONFIG key=value ...' on every worker of every slice at once, detached
(setsid nohup), appending to ~/mlgen-logs/NAME.log on each worker, with MLGEN_DISTRIBUTED=1
(jax.distributed.initialize() finds the other hosts). A multislice also gets
MEGASCALE_COORDINATOR_ADDRESS (worker 0 of NAME-0), MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID
and MEGASCALE_PORT. Running the same launch again resumes from the workdir's latest checkpoint.

  workdir=gs://...       required on a multi-host slice: every host must see the same checkpoints
  --allow-local-workdir  accept another workdir anyway (a shared disk mounted on every host)
  --accelerator TYPE     the slice's type, to tell a single-host one without asking gcloud
  --coordinator IP       worker 0 of NAME-0, instead of asking gcloud
  --env KEY=VALUE        more environment for mlgen train (repeatable)" ;;
    logs) echo "usage: pod.sh logs NAME [--worker=0|K|all] [--slice I] [--lines N] [--no-follow]
                   [--num-slices N] [--zone ZONE] [--project P] [--dry-run]

Tails ~/mlgen-logs/NAME.log (the last --lines, default 100, then follows) on worker 0, or
--worker K, or every worker (--worker=all), of slice 0 or --slice I." ;;
    stop) echo "usage: pod.sh stop NAME [--num-slices N] [--zone ZONE] [--project P] [--dry-run]

Stops the run launch started on every worker of every slice (SIGTERM to its process group,
SIGKILL after 30 s) and frees the TPU (removes /tmp/libtpu_lockfile)." ;;
    delete) echo "usage: pod.sh delete NAME [--queued] [--quiet] [--num-slices N] [--zone ZONE]
                     [--project P] [--dry-run]

Deletes the TPU VM, or with --queued (implied by --num-slices N > 1) the queued resource and
its slices (--force). --quiet: no confirmation prompt." ;;
  esac
}

# ---- arguments ---------------------------------------------------------------------------
cmd="" name="" zone="${CLOUDSDK_COMPUTE_ZONE:-}" project="${CLOUDSDK_CORE_PROJECT:-}"
num_slices=1 accel="" version="" queued=0 spot=0 preemptible=0 repo="" python=3.12
allow_local=0 coordinator="" worker=0 slice=0 lines=100 follow=1 quiet=0 help=0
positional=() envs=()

VALUE_FLAGS=" --zone --project --num-slices --accelerator --accelerator-type --version
 --runtime-version --repo --python --coordinator --env --worker --slice --lines "
COMMON_FLAGS=" -h --help --dry-run --zone --project --num-slices "
flags_of() {  # flags_of SUBCOMMAND: the flags it takes besides COMMON_FLAGS
  case "$1" in
    create) echo "--accelerator --accelerator-type --version --runtime-version --queued --spot --preemptible" ;;
    setup) echo "--repo --python" ;;
    launch) echo "--accelerator --accelerator-type --allow-local-workdir --coordinator --env" ;;
    logs) echo "--worker --slice --lines --no-follow" ;;
    stop) echo "" ;;
    delete) echo "--queued --quiet" ;;
  esac
}
seen=()

while [[ $# -gt 0 ]]; do
  arg=$1
  shift
  if [[ "$arg" =~ ^(--[a-z-]+)=(.*)$ ]]; then arg=${BASH_REMATCH[1]}; set -- "${BASH_REMATCH[2]}" "$@"; fi
  case "$arg" in
    --) positional+=("$@"); break ;;
    -*) seen+=("$arg") ;;
    *) if [[ -z "$cmd" ]]; then cmd=$arg; else positional+=("$arg"); fi; continue ;;
  esac
  case "$arg" in
    -h | --help) help=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --preemptible) preemptible=1 ;;
    --allow-local-workdir) allow_local=1 ;;
    --no-follow) follow=0 ;;
    --quiet) quiet=1 ;;
  esac
  in_list "$VALUE_FLAGS" "$arg" || continue
  [[ $# -ge 1 ]] || die "$arg: needs a value"
  val=$1
  shift
  case "$arg" in
    --zone) zone=$val ;;
    --project) project=$val ;;
    --num-slices) check_count "$arg" "$val"; num_slices=$val ;;
    --accelerator | --accelerator-type) accel=$val ;;
    --version | --runtime-version) version=$val ;;
    --repo) repo=$val ;;
    --python) python=$val ;;
    --coordinator) coordinator=$val ;;
    --env) [[ "$val" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env: expected KEY=VALUE, got '$val'"
      envs+=("$val") ;;
    --worker) [[ "$val" =~ ^(all|[0-9]+)$ ]] || die "--worker: expected a worker number or all, got '$val'"
      worker=$val ;;
    --slice) [[ "$val" =~ ^[0-9]+$ ]] || die "--slice: expected a slice number, got '$val'"; slice=$val ;;
    --lines) check_count "$arg" "$val"; lines=$val ;;
  esac
done

case "$cmd" in
  "") if (( help )); then echo "$USAGE"; exit 0; fi
    die "SUBCOMMAND: missing (create, setup, launch, logs, stop or delete)" ;;
  create | setup | launch | logs | stop | delete) ;;
  *) die "SUBCOMMAND: unknown '$cmd' (create, setup, launch, logs, stop or delete)" ;;
esac
allowed="$COMMON_FLAGS $(flags_of "$cmd")"
for arg in ${seen[@]+"${seen[@]}"}; do
  in_list "$allowed" "$arg" || die "$arg: not a flag of $cmd (pod.sh $cmd --help lists them)"
done
if (( help )); then
  help_of "$cmd"
  exit 0
fi
[[ ${#positional[@]} -ge 1 ]] || die "NAME: missing (pod.sh $cmd NAME ...)"
name=${positional[0]}
positional=("${positional[@]:1}")
check_name "$name"
[[ -n "$zone" ]] || die "--zone: missing (or set CLOUDSDK_COMPUTE_ZONE)"
loc=(--zone="$zone")
[[ -z "$project" ]] || loc+=(--project="$project")
(( num_slices == 1 )) || queued=1
if [[ "$cmd" != launch && ${#positional[@]} -gt 0 ]]; then
  die "${positional[0]}: unexpected argument (pod.sh $cmd --help)"
fi

# ---- subcommands -------------------------------------------------------------------------
# shellcheck disable=SC2088  # a path on the workers, expanded by their shell
LOGS="~/mlgen-logs"
ssh_all() {  # ssh_all TPU COMMAND: COMMAND on every worker of one slice
  run gcloud compute tpus tpu-vm ssh "$1" "${loc[@]}" --worker=all --command="$2"
}

cmd_create() {
  [[ -n "$accel" ]] || die "--accelerator: missing (e.g. --accelerator v5p-128)"
  check_accelerator "$accel"
  [[ -n "$version" ]] || version=$(default_version "$accel")
  (( ! (spot && preemptible) )) || die "--preemptible: not with --spot (pick one)"
  if (( queued )); then
    (( ! preemptible )) || die "--preemptible: a queued resource takes --spot instead"
    local nodes=(--node-id="$name")
    (( num_slices == 1 )) || nodes=(--node-count="$num_slices" --node-prefix="$name")
    local extra=()
    (( ! spot )) || extra+=(--spot)
    run gcloud compute tpus queued-resources create "$name" "${loc[@]}" \
      --accelerator-type="$accel" --runtime-version="$version" "${nodes[@]}" ${extra[@]+"${extra[@]}"}
  else
    local extra=()
    (( ! spot )) || extra+=(--spot)
    (( ! preemptible )) || extra+=(--preemptible)
    run gcloud compute tpus tpu-vm create "$name" "${loc[@]}" \
      --accelerator-type="$accel" --version="$version" ${extra[@]+"${extra[@]}"}
  fi
}

cmd_setup() {
  local install="cd ~/mlgen && python3 -m pip install -q --user -U uv"
  install+=" && ~/.local/bin/uv venv -q --allow-existing --python $python .venv"
  install+=" && . .venv/bin/activate && ~/.local/bin/uv pip install -q -e \".[tpu]\""
  local tpu
  if [[ -n "$repo" ]]; then
    local get="if [ -d ~/mlgen/.git ]; then git -C ~/mlgen pull -q --ff-only;"
    get+=" else git clone -q $(quote "$repo") ~/mlgen; fi"
    for tpu in $(slice_names "$name" "$num_slices"); do ssh_all "$tpu" "$get && $install"; done
    return
  fi
  local root tarball="${TMPDIR:-/tmp}/mlgen-$name.tar.gz"
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if (( DRY_RUN )); then
    echo "git -C $(quote "$root") ls-files -z --cached --others --exclude-standard" \
      "| tar -czf $(quote "$tarball") -C $(quote "$root") --null -T -"
  else
    git -C "$root" ls-files -z --cached --others --exclude-standard \
      | tar -czf "$tarball" -C "$root" --null -T -
  fi
  local unpack="mkdir -p ~/mlgen && tar -xzf ~/mlgen.tar.gz -C ~/mlgen && rm ~/mlgen.tar.gz"
  for tpu in $(slice_names "$name" "$num_slices"); do
    run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:~/mlgen.tar.gz" "${loc[@]}" --worker=all
    ssh_all "$tpu" "$unpack && $install"
  done
}

cmd_launch() {
  [[ ${#positional[@]} -ge 1 ]] || die "CONFIG: missing (pod.sh launch NAME CONFIG [key=value ...])"
  local config=${positional[0]} overrides=("${positional[@]:1}") o workdir="" multi
  for o in ${overrides[@]+"${overrides[@]}"}; do
    [[ "$o" == *=* ]] || die "$o: expected a key=value override"
    [[ "$o" != workdir=* ]] || workdir=${o#workdir=}
  done
  [[ -z "$accel" ]] || check_accelerator "$accel"
  if [[ "$workdir" != gs://* ]] && (( ! allow_local )); then
    if (( num_slices > 1 )); then
      multi=1
    else
      [[ -n "$accel" ]] || accel=$(capture v5p-16 gcloud compute tpus tpu-vm describe "$name" \
        "${loc[@]}" --format="value(acceleratorType)")
      multi=0
      ! multi_host "${accel##*/}" || multi=1
    fi
    (( ! multi )) || die "workdir=${workdir:-(not given)}: a multi-host slice needs" \
      "workdir=gs://BUCKET/RUN (every host must see the same checkpoints), or --allow-local-workdir"
  fi
  if (( num_slices > 1 )) && [[ -z "$coordinator" ]]; then
    coordinator=$(capture "<ip-of-$name-0-worker-0>" gcloud compute tpus tpu-vm describe "$name-0" \
      "${loc[@]}" --format="value(networkEndpoints[0].ipAddress)")
  fi
  local train
  train=".venv/bin/mlgen train $(quote "$config")"
  for o in ${overrides[@]+"${overrides[@]}"}; do train+=" $(quote "$o")"; done
  local log="$LOGS/$name.log" pid="$LOGS/$name.pid" tpu i=0
  for tpu in $(slice_names "$name" "$num_slices"); do
    local env="MLGEN_DISTRIBUTED=1"
    if (( num_slices > 1 )); then
      env+=" MEGASCALE_COORDINATOR_ADDRESS=$coordinator:8081 MEGASCALE_NUM_SLICES=$num_slices"
      env+=" MEGASCALE_SLICE_ID=$i MEGASCALE_PORT=8081"
    fi
    for o in ${envs[@]+"${envs[@]}"}; do env+=" $(quote "$o")"; done
    ssh_all "$tpu" "set -e; mkdir -p $LOGS; cd ~/mlgen; if [ -f $pid ] && kill -0 \$(cat $pid) 2>/dev/null;\
 then echo \"$name is already running on \$(hostname): pod.sh stop first\" >&2; exit 1; fi;\
 export $env; setsid nohup $train >> $log 2>&1 < /dev/null & echo \$! > $pid"
    i=$(( i + 1 ))
  done
}

cmd_logs() {
  (( slice < num_slices )) || die "--slice: $slice is not below --num-slices $num_slices"
  local tpu=$name tail="tail -n $lines"
  (( num_slices == 1 )) || tpu="$name-$slice"
  (( ! follow )) || tail+=" -F"
  run gcloud compute tpus tpu-vm ssh "$tpu" "${loc[@]}" --worker="$worker" \
    --command="$tail $LOGS/$name.log"
}

cmd_stop() {
  local pid="$LOGS/$name.pid" tpu
  local stop="if [ -f $pid ]; then p=\$(cat $pid); kill -TERM -- -\$p 2>/dev/null;"
  stop+=" for i in \$(seq 30); do kill -0 -- -\$p 2>/dev/null || break; sleep 1; done;"
  stop+=" kill -KILL -- -\$p 2>/dev/null; rm -f $pid; fi; sudo rm -f /tmp/libtpu_lockfile"
  for tpu in $(slice_names "$name" "$num_slices"); do ssh_all "$tpu" "$stop"; done
}

cmd_delete() {
  local extra=()
  (( ! quiet )) || extra+=(--quiet)
  if (( queued )); then
    run gcloud compute tpus queued-resources delete "$name" "${loc[@]}" --force ${extra[@]+"${extra[@]}"}
  else
    run gcloud compute tpus tpu-vm delete "$name" "${loc[@]}" ${extra[@]+"${extra[@]}"}
  fi
}

"cmd_$cmd"
