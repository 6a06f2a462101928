#!/bin/bash
# Device-tool driver for the training benchmarks (see bench/README.md):
#   PARTS="smoke multi bench official" BENCH_ARGS="..." OFFICIAL_ARGS="..." bash bench/run_gpu_training.sh
# Installs the carried wheels (.whl/*.whl, listed in bench/wheels.txt; with PINNED=1 also the
# project's pinned flax / optax / orbax / chex from .whl/pinned/), prints the versions, then runs the
# parts named in PARTS, each under its own time limit; results and logs land in $OUT.
#   smoke     a few steps of a small HMAR on GPU $GPU (the trainer, Triton kernels, checkpoints)
#   multi     bench/multi_gpu.py: every 2-GPU layout against one GPU
#   bench     bench/train_step.py $BENCH_ARGS on GPU $GPU
#   profile   bench/train_step.py with a profile of $PROFILE_SETTING, summarised by bench/profile_summary.py,
#             and the step's optimised HLO
#   official  bench/official_train_step_torch.py $OFFICIAL_ARGS on GPU $GPU (the official PyTorch step)
#   sample    bench/sample.py $SAMPLE_ARGS on GPU $GPU (the sampler: start-up, images/s, memory)
#   official_sample  bench/official_sample_torch.py $OFFICIAL_SAMPLE_ARGS on GPU $GPU (the official sampler)
#   official_mar  bench/official_mar_torch.py $OFFICIAL_MAR_ARGS (the official MAR / Hi-MAR code)
#   launch    a small HMAR through launch/gpu_host.sh with two processes (one per GPU): a run never
#             stopped, and one sent SIGTERM mid-way then rerun; bench/compare_metrics.py compares them
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
GPU=${GPU:-0}  # the GPU the one-GPU parts run on (two drivers can run side by side on GPUs 0 and 1,
               # the second with SKIP_INSTALL=1 once the first has installed the wheels)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > "$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)"
fi
if [ "${PINNED:-0}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/pinned/*.whl >> "$OUT/pip.log" 2>&1 || echo "pinned install failed"
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint as o, triton, grain; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, 'triton', triton.__version__, 'grain', grain.__version__, jax.devices())" 2>&1 | tail -1
for part in ${PARTS:-smoke}; do
  echo "== $part"; t0=$(date +%s)
  case $part in
    smoke)
      CUDA_VISIBLE_DEVICES=$GPU timeout "${SMOKE_S:-120}" python3 -m hmar_jax.train --config=configs/hmar.py:tiny \
        --workdir=/tmp/smoke --config.model.width=256 --config.model.num_heads=4 --config.train.num_steps=8 \
        --config.log.every_steps=2 --config.checkpoint.every_steps=4 --config.data.num_examples=256 \
        --config.sample.grid_at_end=False > "$OUT/smoke.log" 2>&1; echo "exit $?"
      tr '\r' '\n' < "$OUT/smoke.log" | grep -v "^W\|^I\|tokenis" | tail -4 | cut -c1-300
      tail -1 /tmp/smoke/metrics.jsonl 2>/dev/null | cut -c1-300 ;;
    multi)
      # The layouts' runs share XLA's GEMM autotuning results (timings are not what this part measures).
      XLA_FLAGS="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_autotune" \
        timeout "${MULTI_S:-300}" python3 bench/multi_gpu.py --out "$OUT/two_gpu.json" --logs "$OUT/two_gpu_logs" \
        ${MULTI_ARGS:-} 2>&1 | tail -9 ;;
    bench)
      CUDA_VISIBLE_DEVICES=$GPU timeout "${BENCH_S:-420}" python3 bench/train_step.py --out "$OUT/train_step.json" \
        ${BENCH_ARGS:-} 2>&1 | grep -v "^W\|^I" | tail -14 | cut -c1-400 ;;
    profile)
      # The optimised HLO of the step comes back too (hlo_train_step.txt.gz): it names each fusion's ops.
      CUDA_VISIBLE_DEVICES=$GPU XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*" \
        timeout "${PROFILE_S:-240}" python3 bench/train_step.py --settings "${PROFILE_SETTING:-hmar:d24:32}" \
        --steps 5 --profile /tmp/prof --out "$OUT/profiled_step.json" 2>&1 | grep -v "^W\|^I" | tail -3 | cut -c1-400
      f=$(ls -S /tmp/hlo/*train_step*after_optimizations.txt 2>/dev/null | head -1)
      [ -n "$f" ] && gzip -c "$f" > "$OUT/hlo_train_step.txt.gz"
      python3 bench/profile_summary.py /tmp/prof --steps 5 --top 45 --out "$OUT/profile_summary.json" 2>&1 | tail -60 ;;
    launch)
      # The reference run (never stopped) and the run that is stopped run side by side on the same two
      # GPUs (tiny models; each process takes a fifth of a GPU's memory); the resumed run then loads the
      # stopped run's compiled step from JAX's persistent cache. No GEMM autotuning: every run compiles
      # the same kernels, so a resumed run can match the reference bit for bit.
      export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 \
        XLA_FLAGS="--xla_gpu_autotune_level=0"
      args=(--config.model.width=256 --config.model.num_heads=4 --config.train.num_steps="${LAUNCH_STEPS:-300}"
        --config.log.every_steps=10 --config.checkpoint.every_steps=50 --config.data.num_examples=512
        --config.sample.grid_at_end=False)
      rm -rf /tmp/launch_ref /tmp/launch_run
      MASTER_PORT=12356 NPROC=2 SKIP_INSTALL=1 timeout 400 launch/gpu_host.sh configs/hmar.py:tiny /tmp/launch_ref \
        "${args[@]}" > "$OUT/launch_reference.log" 2>&1 &
      ref=$!
      NPROC=2 SKIP_INSTALL=1 launch/gpu_host.sh configs/hmar.py:tiny /tmp/launch_run "${args[@]}" \
        > "$OUT/launch_stopped.log" 2>&1 &
      pid=$!
      for _ in $(seq 800); do  # SIGTERM once the run has logged step STOP_AT (not a checkpoint step)
        last=$(tail -1 /tmp/launch_run/metrics.jsonl 2>/dev/null | python3 -c "import json,sys; print(json.loads(sys.stdin.read() or '{}').get('step', 0))" 2>/dev/null)
        [ "${last:-0}" -ge "${STOP_AT:-130}" ] && break; sleep 0.5
      done
      kill -TERM "$pid"; wait "$pid"; echo "stopped run exit $? after step ${last:-?} ($(( $(date +%s) - t0 )) s)"
      wait "$ref"; echo "reference run exit $? ($(( $(date +%s) - t0 )) s)"
      NPROC=2 SKIP_INSTALL=1 timeout 300 launch/gpu_host.sh configs/hmar.py:tiny /tmp/launch_run "${args[@]}" \
        > "$OUT/launch_resumed.log" 2>&1; echo "resumed run exit $?"
      python3 bench/compare_metrics.py /tmp/launch_ref/metrics.jsonl /tmp/launch_run/metrics.jsonl \
        --out "$OUT/launch_resume.json" | tail -4
      cp /tmp/launch_run/metrics.jsonl "$OUT/launch_run_metrics.jsonl" 2>/dev/null ;;
    sample)
      CUDA_VISIBLE_DEVICES=$GPU timeout "${SAMPLE_S:-540}" python3 bench/sample.py --out "$OUT/sample.json" \
        ${SAMPLE_ARGS:-} 2>&1 | grep -v "^W\|^I" | tail -12 | cut -c1-400 ;;
    official_sample)
      CUDA_VISIBLE_DEVICES=$GPU timeout "${OFFICIAL_SAMPLE_S:-240}" python3 bench/official_sample_torch.py \
        --ref_dir .whl/official_hmar --out "$OUT/official_sample.json" ${OFFICIAL_SAMPLE_ARGS:-} 2>&1 | tail -8 | cut -c1-300 ;;
    official_mar)
      CUDA_VISIBLE_DEVICES=$GPU timeout "${OFFICIAL_MAR_S:-400}" python3 bench/official_mar_torch.py \
        --mar_dir .whl/official_mar --himar_dir .whl/official_himar --out "$OUT/official_mar.json" \
        ${OFFICIAL_MAR_ARGS:-} 2>&1 | tail -10 | cut -c1-300 ;;
    official)
      CUDA_VISIBLE_DEVICES=$GPU TRITON_ALLOW_NON_CONSTEXPR_GLOBALS=1 timeout "${OFFICIAL_S:-240}" \
        python3 bench/official_train_step_torch.py --ref_dir .whl/official_hmar --out "$OUT/official_train_step.json" \
        ${OFFICIAL_ARGS:-} 2>&1 | tail -8 | cut -c1-300 ;;
  esac
  echo "== $part took $(( $(date +%s) - t0 )) s"
done
