"""Probe (GPU, one run): is a Mosaic-GPU FlashAttention-3 style forward faster than our Triton one?

Times JAX's own FA3 example kernel (jax.experimental.pallas.ops.gpu.attention_mgpu: two compute
warpgroups in ping-pong plus a TMA producer warpgroup) on dense attention of one 4096-token scale,
B8 H16 D64 float16, against our Triton forward on the same problem (patch_nums (64,),
block_diagonal), and prints TFLOP/s. Decides whether a block-sparse Mosaic-GPU forward is worth
writing (bench/NOTES_attention.md). Also saves the image's Mosaic-GPU sources to $OUT for reading.

  python bench/probe_mosaic_fa3.py --out probe.json
"""

import argparse
import json
import os
import shutil
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.pallas.mosaic_gpu import core, primitives  # noqa: E402
from jax.experimental.pallas.ops.gpu import attention_mgpu as am  # noqa: E402

from bench.attention import LAYOUTS, B, D, H, _now, fwd_step, matmul_tflops, time_loop  # noqa: E402
from pallas_kernels import triton_gpu  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--src_dir", default="")
  args = ap.parse_args()
  if args.src_dir:
    os.makedirs(args.src_dir, exist_ok=True)
    for mod in (am, primitives, core):
      shutil.copy(mod.__file__, os.path.join(args.src_dir, os.path.basename(mod.__file__)))
  rows = []
  peak = matmul_tflops()
  print(f"bf16 matmul {peak:.0f} TFLOP/s")
  L = 4096
  ks = jax.random.split(jax.random.key(0), 3)
  for dtype in (jnp.float16, jnp.bfloat16):
    q, k, v = (jax.random.normal(x, (B, L, H, D), dtype) for x in ks)
    g = jnp.zeros_like(q)
    flops = 4 * B * H * L * L * D
    cands = {}
    for bq, bkv, st in ((64, 64, 2), (64, 64, 3), (64, 64, 4), (64, 128, 2), (64, 128, 3), (128, 64, 2), (128, 128, 2)):
      cfg = am.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=st)
      cands[f"mgpu_fa3_q{bq}_kv{bkv}_s{st}"] = lambda q, k, v, cfg=cfg: am.attention(q, k, v, cfg)
    for name, cfg in (("triton_long", triton_gpu.LONG_CONFIG), ("triton_short", triton_gpu.SHORT_CONFIG)):
      cands[name] = lambda q, k, v, cfg=cfg: triton_gpu.scale_attention_triton(
        q, k, v, (64,), "block_diagonal", scale=D**-0.5, config=cfg
      )
    for name, fn in cands.items():
      try:
        t = time_loop(fwd_step(fn), (q, k, v, g))
        row = dict(name=name, dtype=jnp.dtype(dtype).name, ms=t * 1e3, tflops=flops / t / 1e12)
      except Exception as e:  # noqa: BLE001
        row = dict(name=name, dtype=jnp.dtype(dtype).name, error=f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc(limit=2)
      rows.append(row)
      print(row, flush=True)
  # Shipped kernel at 9451, same run.
  pn = LAYOUTS[9451]
  for pattern in ("block_diagonal", "block_causal"):
    q, k, v = (jax.random.normal(x, (B, 9451, H, D), jnp.bfloat16) for x in ks)
    t = time_loop(
      fwd_step(lambda q, k, v, pattern=pattern: triton_gpu.scale_attention_triton(q, k, v, pn, pattern, scale=D**-0.5)),
      (q, k, v, jnp.zeros_like(q)),
    )
    rows.append(dict(name=f"triton_auto_9451_{pattern}", dtype="bfloat16", ms=t * 1e3))
    print(rows[-1], flush=True)
  with open(args.out, "w") as f:
    json.dump(
      dict(date=_now(), device=str(jax.devices()[0].device_kind), jax=jax.__version__, matmul_tflops=peak, rows=rows),
      f,
      indent=1,
    )


if __name__ == "__main__":
  main()
