#!/usr/bin/env bash
# Training on GPU hosts: one process over all of a host's GPUs, or one process per GPU, on one or
# several hosts (jax.distributed with a coordinator on the first host).
#
#   launch/gpu_host.sh [--dry-run] CONFIG WORKDIR [--config.x=y ...]
#
#   launch/gpu_host.sh configs/hmar.py:d16 runs/d16                        # 1 process, all GPUs
#   NPROC=8 launch/gpu_host.sh configs/hmar.py:d24 runs/d24 --config.mesh.shape='(2,2,2)'
#                                                                           # 8 processes, 1 GPU each
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=host0 NPROC=8 launch/gpu_host.sh ...  # on each of 4 hosts
#   GPUS=8 NPROC=8 launch/gpu_host.sh --dry-run configs/hmar.py:d24 runs/d24  # print, run nothing
#
# Environment: NPROC processes on this host (default 1: one process sees every GPU); NNODES hosts
# (default 1), NODE_RANK this host's index, MASTER_ADDR / MASTER_PORT the coordinator (process 0's
# host, default port 12355). With NPROC > 1 process i gets the i-th equal share of the GPUs that
# CUDA_VISIBLE_DEVICES lists (all GPUs when unset). Under Slurm use launch/slurm.sbatch instead.
# SKIP_INSTALL=1 reuses the current environment instead of installing the CUDA stack; PYTHON picks
# the interpreter (default python3). Paths are relative to the directory you run this from.
# --dry-run prints the commands and runs none of them: nothing is installed and JAX is not
# imported, so the GPU count is GPUS (default: NPROC, one GPU per process).
# Every process writes checkpoints, metrics.jsonl and TensorBoard logs under WORKDIR (one folder
# that all hosts see); its console output stays on this terminal.
# SIGTERM / SIGINT are passed on to every process: each saves a checkpoint at the same step and
# stops (exit 143); rerunning the same command resumes from the newest checkpoint in WORKDIR.
set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 2
}
# One word, quoted for the shell only where it needs it (so the printed commands can be pasted).
q() {
  case $1 in
    '') printf "''" ;;
    *[!A-Za-z0-9_./:=@%+,-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}
show() {
  local out="+" a
  for a in "$@"; do out+=" $(q "$a")"; done
  echo "$out"
}
whole() { [[ $1 =~ ^(0|[1-9][0-9]*)$ ]]; }

dry=0
if [ "${1:-}" = --dry-run ]; then
  dry=1
  shift
fi
usage="[NPROC=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] $0 [--dry-run] CONFIG WORKDIR [--config.x=y ...]"
[ $# -ge 2 ] || die "CONFIG and WORKDIR are required; usage: $usage"
config=$1
workdir=$2
shift 2
[ -n "$workdir" ] || die "WORKDIR is empty"
file=${config%%:*}
[ -f "$file" ] || die "config file not found: $file (from CONFIG=$config)"
nproc=${NPROC:-1}
nnodes=${NNODES:-1}
rank=${NODE_RANK:-0}
port=${MASTER_PORT:-12355}
whole "$nproc" && [ "$nproc" -ge 1 ] || die "NPROC must be a whole number >= 1, got '$nproc'"
whole "$nnodes" && [ "$nnodes" -ge 1 ] || die "NNODES must be a whole number >= 1, got '$nnodes'"
whole "$rank" || die "NODE_RANK must be a whole number, got '$rank'"
[ "$rank" -lt "$nnodes" ] || die "NODE_RANK=$rank must be below NNODES=$nnodes"
whole "$port" && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "MASTER_PORT must be a port number, got '$port'"
if [ "$nnodes" -gt 1 ]; then
  [ -n "${MASTER_ADDR:-}" ] || die "NNODES=$nnodes needs MASTER_ADDR (the host of NODE_RANK=0)"
  [ -n "${NODE_RANK:-}" ] || die "NNODES=$nnodes needs NODE_RANK (this host's index, 0 to $((nnodes - 1)))"
fi
addr=${MASTER_ADDR:-localhost}

# The commands run in the repository root; relative paths given from elsewhere are made absolute.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
if [ "$(pwd -P)" != "$repo" ]; then
  [[ $file == /* ]] || config="$PWD/$config"
  [[ $workdir == /* ]] || workdir="$PWD/$workdir"
fi
cd "$repo"
py=${PYTHON:-python3}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  install=("$py" -m pip install -q -r requirements.txt -e . "jax[cuda13]" jax-triton)
  show "${install[@]}"
  [ $dry = 1 ] || "${install[@]}"
fi

probe='import jax; d = jax.devices(); print(len(d) if d[0].platform == "gpu" else 0)'
show "$py" -c "$probe"
if [ $dry = 1 ]; then
  # Without GPUs to count: GPUS, else as many as CUDA_VISIBLE_DEVICES lists, else one per process.
  listed=${CUDA_VISIBLE_DEVICES:+$(tr , '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)}
  gpus=${GPUS:-${listed:-$nproc}}
  whole "$gpus" || die "GPUS must be a whole number, got '$gpus'"
  echo "# dry run: GPU count taken as $gpus"
else
  err=$(mktemp)
  gpus=$("$py" -c "$probe" 2>"$err") || gpus=
  why=$(tail -n 1 "$err")
  rm -f "$err"
  [ -n "$gpus" ] || die "could not count the GPUs with JAX: $why"
  gpus=$(tail -n 1 <<<"$gpus")
  whole "$gpus" && [ "$gpus" -gt 0 ] || die "no GPU visible to JAX (is the CUDA stack installed? see SKIP_INSTALL)"
fi
[ "$nproc" -le "$gpus" ] || die "NPROC=$nproc but only $gpus GPUs are visible"
[ $((gpus % nproc)) = 0 ] || die "NPROC=$nproc does not divide the $gpus visible GPUs into equal shares"

train=("$py" -m hmar_jax.train --config="$config" --workdir="$workdir")
if [ "$nproc" = 1 ] && [ "$nnodes" = 1 ]; then
  show "${train[@]}" "$@"
  [ $dry = 1 ] && exit 0
  exec "${train[@]}" "$@"
fi

# Physical GPU ids as CUDA sees them: CUDA_VISIBLE_DEVICES (when set) lists the usable ones.
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
else
  ids=()
  for ((g = 0; g < gpus; g++)); do ids+=("$g"); done
fi
total=$((nproc * nnodes))
per=$((gpus / nproc))
pids=()
stopping=0
stop() {
  # One SIGTERM each: the trainers save at an agreed step and exit 143.
  [ $stopping = 1 ] && return 0
  stopping=1
  [ ${#pids[@]} = 0 ] || kill -TERM "${pids[@]}" 2>/dev/null || true
}
trap stop TERM INT
for ((i = 0; i < nproc; i++)); do
  visible=$(IFS=,; echo "${ids[*]:i*per:per}")
  dist=(--config.distributed.mode=explicit --config.distributed.coordinator_address="$addr:$port"
    --config.distributed.num_processes="$total" --config.distributed.process_id=$((rank * nproc + i)))
  env_=()
  # One process per host keeps the caller's CUDA_VISIBLE_DEVICES (all GPUs when unset).
  [ "$nproc" = 1 ] || env_=(env CUDA_VISIBLE_DEVICES="$visible")
  show "${env_[@]}" "${train[@]}" "${dist[@]}" "$@"
  [ $dry = 1 ] && continue
  "${env_[@]}" "${train[@]}" "${dist[@]}" "$@" &
  pids+=($!)
done
[ $dry = 1 ] && exit 0
status=0
for pid in "${pids[@]}"; do
  # A failed process stops the others (they cannot finish without it); a signal interrupts the wait.
  wait "$pid" || {
    code=$?
    [ "$status" = 0 ] && status=$code
    stop
  }
done
wait || true # processes still saving after an interrupted wait
exit "$status"
