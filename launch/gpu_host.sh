#!/usr/bin/env bash
# Training on GPU hosts: one process over all of a host's GPUs, or one process per GPU, on one or
# several hosts (jax.distributed with a coordinator on the first host).
#
#   launch/gpu_host.sh CONFIG WORKDIR [--config.x=y ...]
#
#   launch/gpu_host.sh configs/hmar.py:d16 runs/d16                        # 1 process, all GPUs
#   NPROC=8 launch/gpu_host.sh configs/hmar.py:d24 runs/d24 --config.mesh.shape='(2,2,2)'
#                                                                           # 8 processes, 1 GPU each
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=host0 NPROC=8 launch/gpu_host.sh ...  # on each of 4 hosts
#
# Environment: NPROC processes on this host (default 1: one process sees every GPU); NNODES hosts
# (default 1), NODE_RANK this host's index, MASTER_ADDR / MASTER_PORT the coordinator (process 0's
# host, default localhost:12355). Under Slurm, run one task per GPU with `srun` and NPROC=1 instead:
# the trainer joins the job by itself (config.distributed.mode 'auto').
# SKIP_INSTALL=1 reuses the current environment instead of installing the CUDA stack.
# SIGTERM / SIGINT are passed on to every process: each saves a checkpoint at the same step and
# stops (exit 143); rerunning the same command resumes.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: [NPROC=n] [NNODES=m NODE_RANK=r MASTER_ADDR=host] $0 CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  python3 -m pip install -q -r requirements.txt -e . "jax[cuda13]" jax-triton
fi
nproc=${NPROC:-1}; nnodes=${NNODES:-1}; rank=${NODE_RANK:-0}
addr=${MASTER_ADDR:-localhost}; port=${MASTER_PORT:-12355}
gpus=$(python3 -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', f'no GPU visible to JAX: {d}'; print(len(d))")
if [ "$nproc" = 1 ] && [ "$nnodes" = 1 ]; then
  exec python3 -m hmar_jax.train --config="$config" --workdir="$workdir" "$@"
fi
if [ "$nproc" -gt "$gpus" ]; then
  echo "NPROC=$nproc but only $gpus GPUs are visible" >&2
  exit 2
fi
total=$((nproc * nnodes))
pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop TERM INT
for ((i = 0; i < nproc; i++)); do
  # With NPROC = the GPU count, process i owns GPU i; otherwise each owns a contiguous group.
  per=$((gpus / nproc)); first=$((i * per))
  visible=$(seq -s, "$first" $((first + per - 1)))
  CUDA_VISIBLE_DEVICES=$visible python3 -m hmar_jax.train --config="$config" --workdir="$workdir" \
    --config.distributed.mode=explicit --config.distributed.coordinator_address="$addr:$port" \
    --config.distributed.num_processes="$total" --config.distributed.process_id=$((rank * nproc + i)) "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  # A failed process stops the others (they cannot finish without it); a signal interrupts the wait.
  wait "$pid" || { code=$?; [ "$status" = 0 ] && status=$code; stop; }
done
wait || true   # processes still saving after an interrupted wait
exit "$status"
