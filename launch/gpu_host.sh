#!/usr/bin/env bash
# Single GPU host: install the CUDA stack and run one training task.
#
#   launch/gpu_host.sh configs/train_hmar_tiny.py runs/hmar --config.train.num_steps=2000
#
# Arguments: CONFIG WORKDIR [--config.x=y overrides...]. Set SKIP_INSTALL=1 to reuse an environment.
# The train loop runs on one process; sharding it over all GPUs of the host is not wired in yet
# (the model's logical axis rules are in hmar_jax/models/sharding.py).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  python3 -m pip install -q -r requirements.txt -e . "jax[cuda13]" jax-triton
fi
python3 -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', f'no GPU visible to JAX: {d}'; print(d)"
exec python3 -m hmar_jax.train --config="$config" --workdir="$workdir" "$@"
