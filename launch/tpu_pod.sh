#!/usr/bin/env bash
# Training on a Cloud TPU VM slice, one host or a multi-host pod slice: create the slice unless it
# exists, copy the repository to every worker, install the project and jax[tpu] there, and start the
# same training command on all workers (one process per host).
#
#   TPU_NAME=my-pod ZONE=us-east5-a ACCELERATOR_TYPE=v5p-32 \
#     launch/tpu_pod.sh [--dry-run] CONFIG WORKDIR [--config.x=y ...]
#   TPU_NAME=my-pod ZONE=us-east5-a launch/tpu_pod.sh [--dry-run] --stop   # save and stop the run
#
# Environment: TPU_NAME, ZONE and ACCELERATOR_TYPE (v4-32, v5litepod-16, v5p-32, v6e-16, ...) are
# required. RUNTIME_VERSION defaults to the Cloud TPU software version for the chip:
# tpu-ubuntu2204-base (v4 and older), v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
# v2-alpha-tpuv6e (v6e). PROJECT adds --project to every gcloud command; SPOT=1 creates a Spot slice.
# SKIP_COPY=1 keeps the workers' copy of the repository, SKIP_INSTALL=1 their environment.
# GCSFUSE_BUCKET=NAME mounts that bucket on every worker at GCSFUSE_MOUNT (default /mnt/NAME),
# installing gcsfuse where it is missing.
#
# WORKDIR is an absolute path that every worker sees, on a bucket mounted with gcsfuse (above) or a
# shared file system (Filestore): checkpoints, metrics.jsonl and TensorBoard logs go there, and every
# worker writes its shards of each checkpoint. CONFIG is a file inside this repository.
# On each worker: the repository in ~/hmar_jax_repo, Python 3.11 with the project in ~/hmar_jax_venv
# (made with uv: the TPU images ship an older Python), the trainer's output in
# ~/hmar_jax_logs/worker-N.log; worker 0's output is also streamed here.
# Several hosts start jax.distributed explicitly from the slice's metadata (worker number, worker
# addresses; the coordinator on worker 0), which a TPU VM does not put in the environment.
# The trainers run detached from the ssh session. Ctrl-C here, or --stop, sends SIGTERM to every
# worker's trainer: they save a checkpoint at one agreed step and exit 143. A dropped connection
# leaves the run going (follow it with `tail -f ~/hmar_jax_logs/worker-0.log` on worker 0).
# After a preemption rerun the same command: a PREEMPTED slice is deleted and created again, and the
# trainer resumes from the newest checkpoint in WORKDIR.
# --dry-run prints every command (gcloud, pip, python) and runs none of them; gcloud is not needed.
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
words() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}
show() { echo "+ $(words "$@")"; }

# ----------------------------------------------------------------------------------------------
# Run on the workers: sent as text (declare -f) through `gcloud ... ssh --command`. Bad input gives
# one 'error: ...' line and status 2.

# Whether this worker already runs a trainer (its pid file names a live hmar_jax.train process).
hmar_busy() {
  local pid
  pid=$(cat ~/hmar_jax_logs/train.pid 2>/dev/null) || return 1
  [ -n "$pid" ] && grep -qs hmar_jax.train "/proc/$pid/cmdline"
}

# Replaces ~/hmar_jax_repo by the contents of ~/hmar_jax_repo.tgz.
hmar_unpack() {
  if hmar_busy; then
    echo "error: $(hostname) is training (pid $(cat ~/hmar_jax_logs/train.pid)): stop it first (--stop)" >&2
    return 2
  fi
  rm -rf ~/hmar_jax_repo && mkdir -p ~/hmar_jax_repo && tar -xzf ~/hmar_jax_repo.tgz -C ~/hmar_jax_repo &&
    rm -f ~/hmar_jax_repo.tgz
}

# BUCKET DIR: mounts the bucket at DIR with gcsfuse (installed first where missing), unless mounted.
hmar_mount() {
  local bucket=$1 dir=$2 list
  mountpoint -q "$dir" && return 0
  if ! command -v gcsfuse >/dev/null; then
    list="deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt"
    list+=" gcsfuse-$(lsb_release -cs) main"
    {
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
        sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null &&
        echo "$list" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null &&
        sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse >/dev/null
    } || {
      echo "error: $(hostname): could not install gcsfuse" >&2
      return 1
    }
  fi
  sudo mkdir -p "$dir" && sudo chown "$(id -u):$(id -g)" "$dir" && gcsfuse --implicit-dirs "$bucket" "$dir"
}

# CONFIG WORKDIR BUCKET MOUNT [--config.x=y ...]: starts this worker's trainer in the background and
# waits for it; worker 0 also prints its output.
hmar_start() {
  local config=$1 workdir=$2 bucket=$3 mount=$4
  shift 4
  local md=http://metadata.google.internal/computeMetadata/v1/instance/attributes
  local logs=~/hmar_jax_logs py=~/hmar_jax_venv/bin/python w eps n pid log from
  local -a ips=() dist=()
  w=$(curl -sf -H Metadata-Flavor:Google "$md/agent-worker-number") || {
    echo "error: $(hostname) is not a Cloud TPU VM worker (no agent-worker-number in its metadata)" >&2
    return 2
  }
  if hmar_busy; then
    echo "error: worker $w is training already (pid $(cat "$logs/train.pid")): stop it first (--stop)" >&2
    return 2
  fi
  [ -x "$py" ] || {
    echo "error: worker $w: $py not found: run once without SKIP_INSTALL=1" >&2
    return 2
  }
  [ -z "$bucket" ] || hmar_mount "$bucket" "$mount" || return 1
  [ -d "$(dirname "$workdir")" ] || {
    echo "error: worker $w: $(dirname "$workdir") does not exist: WORKDIR must be on a file system every worker mounts" >&2
    return 2
  }
  # 'unknown:unknown:10.130.0.5,...': a worker's internal address in each entry's third field, worker 0 first.
  eps=$(curl -sf -H Metadata-Flavor:Google "$md/worker-network-endpoints") || eps=
  IFS=, read -ra ips <<<"$eps"
  n=${#ips[@]}
  if [ "$n" -gt 1 ]; then
    dist=(--config.distributed.mode=explicit --config.distributed.coordinator_address="$(cut -d: -f3 <<<"${ips[0]}"):8476"
      --config.distributed.num_processes="$n" --config.distributed.process_id="$w")
  fi
  mkdir -p "$logs"
  log=$logs/worker-$w.log
  from=$(($(stat -c %s "$log" 2>/dev/null || echo 0) + 1))
  echo "=== $(date -u +%FT%TZ) worker $w of $((n > 1 ? n : 1)): training in $workdir" >>"$log"
  cd ~/hmar_jax_repo || return 2
  # A session of its own and no hangup: the run outlives this ssh connection and a Ctrl-C on it.
  setsid nohup "$py" -m hmar_jax.train --config="$config" --workdir="$workdir" "${dist[@]}" "$@" \
    >>"$log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$logs/train.pid"
  [ "$w" != 0 ] || tail -f -s 0.5 --pid="$pid" -c +"$from" "$log"
  wait "$pid"
}

# Sends SIGTERM to this worker's trainer and waits until it has saved its checkpoint and exited.
hmar_stop() {
  local pid
  if ! hmar_busy; then
    echo "$(hostname): no training running"
    return 0
  fi
  pid=$(cat ~/hmar_jax_logs/train.pid)
  kill -TERM "$pid" && echo "$(hostname): sent SIGTERM to $pid; waiting for its checkpoint"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
  echo "$(hostname): stopped"
}
# ----------------------------------------------------------------------------------------------

dry=0
stop=0
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --stop) stop=1 ;;
    *) break ;;
  esac
  shift
done
run() {
  show "$@"
  [ $dry = 1 ] || "$@"
}
[ -n "${TPU_NAME:-}" ] || die "set TPU_NAME (the TPU VM slice to use, or to create)"
[ -n "${ZONE:-}" ] || die "set ZONE (the slice's zone, e.g. us-central2-b)"
[ $dry = 1 ] || command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (or use --dry-run)"
gc=(gcloud compute tpus tpu-vm)
at=(--zone="$ZONE")
[ -z "${PROJECT:-}" ] || at+=(--project="$PROJECT")
ssh_all=("${gc[@]}" ssh "$TPU_NAME" "${at[@]}" --worker=all)
stop_all=("${ssh_all[@]}" --command="$(declare -f hmar_busy hmar_stop); hmar_stop")
if [ $stop = 1 ]; then
  [ $# = 0 ] || die "--stop takes no CONFIG or WORKDIR"
  run "${stop_all[@]}"
  exit 0
fi

usage="TPU_NAME=... ZONE=... ACCELERATOR_TYPE=... $0 [--dry-run] CONFIG WORKDIR [--config.x=y ...]"
[ $# -ge 2 ] || die "CONFIG and WORKDIR are required; usage: $usage"
config=$1
workdir=$2
shift 2
accel=${ACCELERATOR_TYPE:-}
[ -n "$accel" ] || die "set ACCELERATOR_TYPE (the slice's type and size, e.g. v5p-32)"
[[ $accel =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] || die "ACCELERATOR_TYPE must look like v5p-32 or v6e-16, got '$accel'"
case $accel in
  v2-* | v3-* | v4-*) runtime=tpu-ubuntu2204-base ;;
  v5litepod-* | v5e-*) runtime=v2-alpha-tpuv5-lite ;;
  v5p-*) runtime=v2-alpha-tpuv5 ;;
  v6e-*) runtime=v2-alpha-tpuv6e ;;
  *) runtime= ;;
esac
runtime=${RUNTIME_VERSION:-$runtime}
[ -n "$runtime" ] || die "no default runtime version for ACCELERATOR_TYPE=$accel: set RUNTIME_VERSION"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
file=${config%%:*}
[ -f "$file" ] || die "config file not found: $file (from CONFIG=$config)"
# The workers run from their copy of the repository: name the config by its path inside it.
abs=$(cd "$(dirname "$file")" && pwd -P)/$(basename "$file")
case $abs in
  "$repo"/*) config=${abs#"$repo"/}${config#"$file"} ;;
  *) die "CONFIG must be a file inside the repository (what is copied to the workers), got $file" ;;
esac
case $workdir in
  gs://*) die "WORKDIR must be a mounted path, not a gs:// URL: set GCSFUSE_BUCKET and use /mnt/BUCKET/..." ;;
  /*) ;;
  *) die "WORKDIR must be an absolute path on a file system every worker mounts (e.g. /mnt/BUCKET/runs/x), got '$workdir'" ;;
esac
bucket=${GCSFUSE_BUCKET:-}
mount=${GCSFUSE_MOUNT:-${bucket:+/mnt/$bucket}}
case ${SPOT:-0} in 0 | 1) ;; *) die "SPOT must be 0 or 1, got '$SPOT'" ;; esac

# 1. The slice: reuse it when READY, create it when missing, recreate it when preempted.
describe=("${gc[@]}" describe "$TPU_NAME" "${at[@]}" --format="value(state,acceleratorType)")
create=("${gc[@]}" create "$TPU_NAME" "${at[@]}" --accelerator-type="$accel" --version="$runtime")
[ "${SPOT:-0}" != 1 ] || create+=(--spot)
delete=("${gc[@]}" delete "$TPU_NAME" "${at[@]}" --quiet)
show "${describe[@]}"
if [ $dry = 1 ]; then
  echo "# when $TPU_NAME does not exist (or was PREEMPTED, after deleting it):"
  show "${create[@]}"
elif out=$("${describe[@]}" 2>&1); then
  read -r state type _ <<<"$out" || true
  case $state in
    READY)
      [ -z "$type" ] || [ "${type##*/}" = "$accel" ] ||
        die "TPU $TPU_NAME is a ${type##*/}, not ACCELERATOR_TYPE=$accel"
      echo "# $TPU_NAME is READY: using it"
      ;;
    PREEMPTED | TERMINATED)
      echo "# $TPU_NAME was $state: deleting it and creating it again"
      run "${delete[@]}"
      run "${create[@]}"
      ;;
    *) die "TPU $TPU_NAME is ${state:-in no known state}: wait until it is READY, or delete it ($(words "${delete[@]}"))" ;;
  esac
elif grep -qiE 'not.?found' <<<"$out"; then
  run "${create[@]}"
else
  echo "error: $(words "${describe[@]}") failed: $(tail -n 1 <<<"$out")" >&2
  exit 1
fi

# 2. The repository (its tracked and unignored files) onto every worker.
if [ "${SKIP_COPY:-0}" != 1 ]; then
  tarball="${TMPDIR:-/tmp}/hmar_jax_repo.XXXXXX"
  if [ $dry = 0 ]; then
    git -C "$repo" rev-parse --git-dir >/dev/null 2>&1 ||
      die "$repo is not a git checkout: copy it to ~/hmar_jax_repo on every worker and set SKIP_COPY=1"
    tarball=$(mktemp "$tarball")
    trap 'rm -f "$tarball"' EXIT
  fi
  echo "+ git -C $(q "$repo") ls-files -z --cached --others --exclude-standard" \
    "| tar -C $(q "$repo") --null --ignore-failed-read -T - -czf $(q "$tarball")"
  if [ $dry = 0 ]; then
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
      tar -C "$repo" --null --ignore-failed-read -T - -czf "$tarball"
  fi
  run "${gc[@]}" scp "$tarball" "$TPU_NAME":hmar_jax_repo.tgz "${at[@]}" --worker=all
  run "${ssh_all[@]}" --command="$(declare -f hmar_busy hmar_unpack); hmar_unpack"
fi

# 3. Python 3.11, the project and jax[tpu] on every worker.
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  # Run by the workers' shell: '~' is each worker's home.
  setup='python3 -m pip install -q --user -U uv'
  setup+=' && python3 -m uv venv -q --allow-existing --python 3.11 ~/hmar_jax_venv'
  setup+=' && python3 -m uv pip install -q --python ~/hmar_jax_venv/bin/python'
  setup+=" -r ~/hmar_jax_repo/requirements.txt -e ~/hmar_jax_repo 'jax[tpu]'"
  run "${ssh_all[@]}" --command="$setup"
fi

# 4. The trainer on every worker; Ctrl-C asks them all to save and stop.
on_interrupt() {
  trap 'echo "interrupted again: the workers go on saving (see ~/hmar_jax_logs on them)" >&2; exit 130' INT
  echo "# Ctrl-C: sending SIGTERM to every worker's trainer; each saves a checkpoint and stops" >&2
  run "${stop_all[@]}" || true
  exit 130
}
start=("${ssh_all[@]}" --command="$(declare -f hmar_busy hmar_mount hmar_start); hmar_start $(words "$config" "$workdir" "$bucket" "$mount" "$@")")
show "${start[@]}"
[ $dry = 1 ] && exit 0
trap on_interrupt INT
status=0
"${start[@]}" || status=$?
exit $status
