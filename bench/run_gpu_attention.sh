#!/bin/bash
# Device-tool driver for the attention GPU work (see bench/NOTES_attention.md):
#   CHECK_ARGS="..." bash bench/run_gpu_attention.sh "<bench/attention.py args>" BENCH_S OFFICIAL_S CHECK_S
# Installs the carried wheels (.whl/*.whl: jax-triton 0.3.1; tokamax 0.0.17 with einshape,
# immutabledict, pydantic(-core), annotated-types, typing-inspection, qwix, and xprof 2.24.2 with
# fire and termcolor for its import; the official HMAR `attn` package copied to .whl/official/),
# then runs the correctness check, the JAX benchmark and the official PyTorch kernel timing, each
# under its own time limit (0 skips it); results and logs land in $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1 || echo "pip install failed"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__, jax.devices())"
if [ "${4:-0}" != "0" ]; then
  timeout "$4" python3 bench/gpu_check_attention.py ${CHECK_ARGS:-} --out "$OUT/gpu_check_attention.json" \
    2>&1 | tee "$OUT/check.log" | grep -v "^W\|^I" | grep -v "^PASS" | tail -30
  echo "checks passed: $(grep -c "^PASS" "$OUT/check.log")"
fi
if [ "${2:-0}" != "0" ]; then
  timeout "$2" python3 bench/attention.py --out "$OUT/attention.json" $1 2>&1 \
    | tee "$OUT/bench.log" | grep -v "^W\|^I" | tail -40
fi
if [ "${3:-0}" != "0" ]; then
  # The official kernel reads a module-level float inside @triton.jit, which Triton 3.6 refuses
  # unless this is set.
  TRITON_ALLOW_NON_CONSTEXPR_GLOBALS=1 timeout "$3" python3 bench/official_attention_torch.py \
    --ref_dir .whl/official --out "$OUT/official.json" 2>&1 | tail -8 | cut -c1-400
fi
