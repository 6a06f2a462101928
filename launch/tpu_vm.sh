#!/usr/bin/env bash
# One TPU VM host (e.g. v4-8, v5e-8): copy the repository there, install the TPU stack, run a task.
#
#   TPU_NAME=my-tpu ZONE=us-central2-b launch/tpu_vm.sh configs/train_hmar_tiny.py runs/hmar
#
# Runs `gcloud compute tpus tpu-vm ssh` against worker 0 only. Multi-host pods need the data
# pipeline sharded per process and jax.distributed.initialize(); the train loops do not do that
# yet, so this script refuses a multi-host slice rather than running the same job on every worker.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
if [ $# -lt 2 ]; then
  echo "usage: TPU_NAME=... ZONE=... $0 CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
hosts=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --format='value(networkEndpoints.len())')
if [ "${hosts:-1}" != 1 ]; then
  echo "$TPU_NAME has $hosts hosts; multi-host training is not supported yet" >&2
  exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" "$repo" "$TPU_NAME":hmar_jax_repo
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --command="cd hmar_jax_repo && \
  python3 -m pip install -q -r requirements.txt -e . 'jax[tpu]' && \
  python3 -m hmar_jax.train --config=$config --workdir=$workdir $*"
