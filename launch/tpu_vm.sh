#!/usr/bin/env bash
# A TPU VM or a multi-host TPU pod slice: copy the repository to every worker, install the TPU
# stack, and start the same training command on all of them (one process per host).
#
#   TPU_NAME=my-tpu ZONE=us-central2-b launch/tpu_vm.sh configs/hmar.py:d16 /mnt/shared/runs/d16 \
#       --config.data.data_dir=/mnt/shared/tfds
#
# The trainer joins the slice by itself (jax.distributed detects TPU pods: config.distributed.mode
# 'auto'); each host reads its own slice of every batch and only worker 0 writes logs and weights.
# WORKDIR must be one folder that every worker sees (a shared file system, e.g. Filestore or a
# bucket mounted with gcsfuse): every worker writes its shards of each checkpoint there. SKIP_COPY=1 skips the copy (the repository is already there).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
if [ $# -lt 2 ]; then
  echo "usage: TPU_NAME=... ZONE=... $0 CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ "${SKIP_COPY:-0}" != 1 ]; then
  gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$ZONE" "$repo" "$TPU_NAME":hmar_jax_repo
fi
printf -v overrides '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="cd hmar_jax_repo && \
  python3 -m pip install -q -r requirements.txt -e . 'jax[tpu]' && \
  python3 -m hmar_jax.train --config=$config --workdir=$workdir $overrides"
