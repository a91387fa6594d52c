# shellcheck shell=bash
# Helpers for tpu_scripts/pod.sh (sourced, not run). Bash 3.2 safe (macOS): no associative
# arrays, and every possibly empty array is expanded as ${a[@]+"${a[@]}"} under `set -u`.

DRY_RUN=0

die() {  # one line naming the argument, exit 2
  echo "pod.sh: $*" >&2
  exit 2
}

# quote WORD: WORD as a shell would need it typed, single-quoted only when it must be.
quote() {
  case "$1" in
    "") printf "''" ;;
    *[!A-Za-z0-9_./:=@%+,~-]*) printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
    *) printf '%s' "$1" ;;
  esac
}

# show CMD...: one command line, each word quoted (a --flag=VALUE word quotes only VALUE).
show() {
  local out="" w
  for w in "$@"; do
    if [[ "$w" =~ ^(--[a-z][a-z0-9-]*=)(.*)$ ]]; then
      out+="${BASH_REMATCH[1]}$(quote "${BASH_REMATCH[2]}") "
    else
      out+="$(quote "$w") "
    fi
  done
  echo "${out% }"
}

# run CMD...: runs it, or under --dry-run prints it.
run() {
  if (( DRY_RUN )); then show "$@"; else "$@"; fi
}

# capture PLACEHOLDER CMD...: CMD's stdout (call it in $(...)); under --dry-run prints CMD on
# the script's stdout (fd 3, which pod.sh opens) and gives PLACEHOLDER.
capture() {
  local placeholder=$1
  shift
  if (( DRY_RUN )); then
    show "$@" >&3
    echo "$placeholder"
  else
    "$@"
  fi
}

# The TPU runtime (software version) each generation is usually run with.
default_version() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "--version: no default runtime for --accelerator $1; pass --version" ;;
  esac
}

check_accelerator() {
  [[ "$1" =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] \
    || die "--accelerator: expected a type like v5p-128, v5litepod-16 or v6e-64, got '$1'"
}

# multi_host TYPE: true when the slice spans more than one host. Every generation puts at most
# 8 of its units (TensorCores for v2-v5p, chips for v5e/v6e) on one host.
multi_host() {
  (( ${1##*-} > 8 ))
}

# slice_names NAME N: the TPU VMs of a pod. A multislice queued resource created with
# --node-prefix NAME names its slices NAME-0 ... NAME-(N-1).
slice_names() {
  local i
  if (( $2 == 1 )); then echo "$1"; else for (( i = 0; i < $2; i++ )); do echo "$1-$i"; done; fi
}

check_name() {
  [[ "$1" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "NAME: '$1' must be lowercase letters, digits and hyphens, starting with a letter"
}

in_list() {  # in_list "WORDS" WORD: WORD is one of the whitespace-separated WORDS
  local w
  for w in $1; do [[ "$w" != "$2" ]] || return 0; done
  return 1
}

check_count() {  # check_count FLAG VALUE
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1: expected a positive integer, got '$2'"
}
