"""GPU benchmark of block-sparse scale attention (issue 4): Triton kernels vs what JAX users have.

Batch 8, 16 heads, head dim 64, lengths 680 / 2240 / 9451 (256 / 512 / 1024 px), both patterns,
bfloat16 (float16 for the kernel too). Compared: our Triton kernels (several tile configs), XLA
dense masked attention and cuDNN (`jax.nn.dot_product_attention(mask=...)`), tokamax where it
imports, the official PyTorch kernel (timed by bench/official_attention_torch.py in its own
process, merged in with --official), and the tile floor: FLOPs of the touched 64x64 tiles
(forward 4*B*H*D per tile element, forward+backward 3.5x that) over the bf16 matmul rate measured
in the same run.

Timing: each measured function runs N times unrolled inside one jit, each iteration's query being
the previous output (a dependency chain, so nothing is hoisted or overlapped, with no host
dispatch per iteration); forward+backward also reads one element of each gradient through an
optimization barrier (so they are computed). Per-iteration time = median over repeats / N.

  python bench/attention.py --out bench/results/attention.json [--official official.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import patterns, tiling, triton_gpu  # noqa: E402

LAYOUTS = {
  680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
  2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
  9451: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
B, H, D = 8, 16, 64
SMOKE = os.environ.get("BENCH_SMOKE") == "1"  # tiny CPU dry run of this script's plumbing
if SMOKE:
  B, H = 1, 2
TC = triton_gpu.TritonConfig
# Tile configs tried: name -> (config, modes timed); the first is the library default.
VARIANTS = {
  "auto": (None, ("fwd", "fwdbwd")),  # the library's per-length choice (config_for_length)
  # Forward: query tile x key tile, warps; _f32 = tl.math.exp2 instead of ex2.approx.ftz.
  "fwd64x64w4": (TC(), ("fwd",)),
  "fwd64x64w4_f32": (TC(fwd_fast_exp2=False), ("fwd",)),
  "fwd128x64w8": (TC(fwd_block_m=128, fwd_warps=8), ("fwd",)),
  "fwd128x64w8_g16": (TC(fwd_block_m=128, fwd_warps=8, fwd_group=16), ("fwd",)),
  "fwd128x64w8_g32": (TC(fwd_block_m=128, fwd_warps=8, fwd_group=32), ("fwd",)),
  "fwd64x64w4_g16": (TC(fwd_group=16), ("fwd",)),
  "fwd128x64w8_f32": (TC(fwd_block_m=128, fwd_warps=8, fwd_fast_exp2=False), ("fwd",)),
  "fwd128x64w4": (TC(fwd_block_m=128, fwd_warps=4), ("fwd",)),
  "fwd128x128w8": (TC(fwd_block_m=128, fwd_block_n=128, fwd_warps=8), ("fwd",)),
  # Backward (the forward in front is 64x64 w4): dK/dV streamed query tile x resident key
  # tile, dQ resident query tile x streamed key tile.
  "bwd64x64w4": (TC(), ("fwdbwd",)),
  "bwd_kv32x128_q128x32_w4": (TC(dkv_block_m=32, dkv_block_n=128, dq_block_m=128, dq_block_n=32), ("fwdbwd",)),
  "bwd_kv64x128_q128x64_w8": (TC(dkv_block_n=128, dkv_warps=8, dq_block_m=128, dq_warps=8), ("fwdbwd",)),
}


def _now():
  return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def time_loop(step, args, n=10, reps=7):
  """Median seconds per iteration of `step`, chained n times inside one jit."""

  def run(q, *rest):
    acc = jnp.zeros((), jnp.float32)
    for _ in range(n):
      q, a = step(q, *rest)
      acc = acc + a
    return q, acc

  f = jax.jit(run)
  jax.block_until_ready(f(*args))  # compile + warm up
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)) / n


def fwd_step(attn):
  def step(q, k, v, g):
    del g
    return attn(q, k, v), jnp.zeros((), jnp.float32)

  return step


def fwdbwd_step(attn):
  def step(q, k, v, g):
    out, vjp = jax.vjp(attn, q, k, v)
    grads = jax.lax.optimization_barrier(vjp(g))
    probe = sum(x[0, 0, 0, 0].astype(jnp.float32) for x in grads)
    return out, probe

  return step


def matmul_tflops(n=8192, reps=10):
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, b))
  best = []
  for _ in range(3):
    t0 = time.perf_counter()
    outs = [f(a, b) for _ in range(reps)]
    jax.block_until_ready(outs)
    best.append((time.perf_counter() - t0) / reps)
  return 2 * n**3 / float(np.median(best)) / 1e12


def implementations(pn, pattern, have_tokamax):
  mask = jnp.asarray(patterns.dense_mask(pn, pattern))[None, None]
  impls = {}
  for name, (cfg, modes) in VARIANTS.items():
    impls[f"triton_{name}"] = (
      functools.partial(triton_gpu.scale_attention_triton, patch_nums=pn, pattern=pattern, scale=D**-0.5, config=cfg),
      modes,
    )
  both = ("fwd", "fwdbwd")
  impls["xla"] = (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla"), both)
  impls["cudnn"] = (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn"), both)
  if have_tokamax:
    import tokamax  # optional baseline, imported only when present (checked in main)

    for impl in ("triton", "mosaic"):
      impls[f"tokamax_{impl}"] = (
        functools.partial(
          lambda q, k, v, impl: tokamax.dot_product_attention(q, k, v, mask=mask, implementation=impl), impl=impl
        ),
        both,
      )
  return impls


def _short(e):
  return f"FAIL {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="bench/results/attention.json")
  parser.add_argument("--official", default=None, help="JSON of bench/official_attention_torch.py")
  parser.add_argument("--lengths", default="680,2240,9451")
  parser.add_argument("--variants", default=",".join(VARIANTS))  # 'auto' = library choice
  parser.add_argument("--dtypes", default="bfloat16,float16")
  parser.add_argument("--baselines", default="xla,cudnn,tokamax")
  parser.add_argument("--probe", action="store_true")
  parser.add_argument(
    "--tune", action="store_true", help="after the sweep, time one config built from the best fwd and bwd"
  )
  args = parser.parse_args()

  report = dict(
    date=_now(),
    device=str(jax.devices()[0].device_kind),
    jax=jax.__version__,
    python=platform.python_version(),
    B=B,
    H=H,
    D=D,
    timing="median of 7 runs of a jit with 10 chained calls; ms per call",
  )
  try:
    # Optional (CUDA): the report records their versions, or why they did not import.
    import jax_triton
    import triton

    report.update(jax_triton=jax_triton.__version__, triton=triton.__version__)
  except Exception as e:  # pylint: disable=broad-except
    report["jax_triton_import"] = _short(e)
  have_tokamax = False
  if "tokamax" in args.baselines:
    try:
      import tokamax  # optional baseline

      report["tokamax"] = tokamax.__version__
      have_tokamax = True
    except Exception as e:  # pylint: disable=broad-except
      report["tokamax"] = _short(e)
  rate = matmul_tflops(512 if SMOKE else 8192)
  report["matmul_tflops_bf16"] = rate
  print(f"bf16 matmul: {rate:.0f} TFLOP/s", flush=True)

  if args.probe:
    # Fixed cost per call: the same small forward chained 1, 10 and 40 times in one jit.
    pn = LAYOUTS[680]
    rng = np.random.default_rng(0)
    q, k, v, g = (jnp.asarray(rng.standard_normal((B, 680, H, D)), jnp.bfloat16) for _ in range(4))
    attn = functools.partial(triton_gpu.scale_attention_triton, patch_nums=pn, pattern="block_diagonal", scale=D**-0.5)
    try:
      report["probe_680_bd_fwd_ms_by_chain"] = {
        n: time_loop(fwd_step(attn), (q, k, v, g), n=n) * 1e3 for n in (1, 10, 40)
      }
    except Exception as e:  # pylint: disable=broad-except
      report["probe_680_bd_fwd_ms_by_chain"] = _short(e)
    print("probe", report["probe_680_bd_fwd_ms_by_chain"], flush=True)

  variants = args.variants.split(",")
  rows = []
  for length in (int(x) for x in args.lengths.split(",")):
    pn = LAYOUTS[length]
    for pattern in ("block_diagonal", "block_causal"):
      elements = tiling.touched_tile_elements(pn, pattern, 64)
      floor_fwd = elements * 4 * B * H * D / (rate * 1e12) * 1e3
      for dtype_name in args.dtypes.split(","):
        dtype = jnp.dtype(dtype_name)
        row = dict(
          L=length,
          pattern=pattern,
          dtype=dtype_name,
          tile_floor_fwd_ms=floor_fwd,
          tile_floor_fwdbwd_ms=3.5 * floor_fwd,
          touched_64x64_tiles=elements // 4096,
        )
        rng = np.random.default_rng(length)
        q, k, v, g = (jnp.asarray(rng.standard_normal((B, length, H, D)), dtype) for _ in range(4))
        impls = implementations(pn, pattern, have_tokamax)
        for name, (attn, modes) in impls.items():
          if name.startswith("triton_"):
            if name[len("triton_") :] not in variants:
              continue
            if dtype_name != "bfloat16" and name != "triton_auto":
              continue
          elif dtype_name != "bfloat16" or name.split("_")[0] not in args.baselines:
            continue
          for mode, step in (("fwd", fwd_step), ("fwdbwd", fwdbwd_step)):
            if mode not in modes:
              continue
            key = f"{name}_{mode}_ms"
            try:
              row[key] = time_loop(step(attn), (q, k, v, g)) * 1e3
            except Exception as e:  # pylint: disable=broad-except
              row[key] = _short(e)
              if name == "triton_auto":
                row[key + "_trace"] = traceback.format_exc()[-2000:]
            print(
              length, pattern, dtype_name, key, row[key] if isinstance(row[key], str) else f"{row[key]:.4f}", flush=True
            )
        rows.append(row)
        report["rows"] = rows
        _write(args.out, report)
  if args.tune:
    tuned = _tune(rows)
    report["tuned_config"] = dataclasses.asdict(tuned)
    print("tuned", report["tuned_config"], flush=True)
    for row in rows:
      if row["dtype"] != "bfloat16":
        continue
      pn = LAYOUTS[row["L"]]
      rng = np.random.default_rng(row["L"])
      q, k, v, g = (jnp.asarray(rng.standard_normal((B, row["L"], H, D)), jnp.bfloat16) for _ in range(4))
      attn = functools.partial(
        triton_gpu.scale_attention_triton, patch_nums=pn, pattern=row["pattern"], scale=D**-0.5, config=tuned
      )
      for mode, step in (("fwd", fwd_step), ("fwdbwd", fwdbwd_step)):
        try:
          row[f"triton_tuned_{mode}_ms"] = time_loop(step(attn), (q, k, v, g)) * 1e3
        except Exception as e:  # pylint: disable=broad-except
          row[f"triton_tuned_{mode}_ms"] = _short(e)
        print(row["L"], row["pattern"], mode, "tuned", row[f"triton_tuned_{mode}_ms"], flush=True)
      _write(args.out, report)
  if args.official and os.path.exists(args.official):
    with open(args.official) as f:
      report["official_same_run"] = json.load(f)
  _write(args.out, report)
  _print_table(report)


def _tune(rows):
  """One config for all lengths: the fwd variant and the bwd variant with the least summed time
  relative to the best at each (L, pattern); fwd fields from one, bwd fields from the other."""

  def best(mode):
    scores = {}
    for name, (cfg, modes) in VARIANTS.items():
      if mode not in modes or cfg is None:
        continue
      total = 0.0
      for row in rows:
        if row["dtype"] != "bfloat16":
          continue
        times = [row.get(f"triton_{n}_{mode}_ms") for n, (_, m) in VARIANTS.items() if mode in m]
        times = [t for t in times if isinstance(t, float)]
        t = row.get(f"triton_{name}_{mode}_ms")
        total += (t / min(times)) if isinstance(t, float) else 1e9
      scores[name] = total
    return VARIANTS[min(scores, key=scores.get)][0]

  fwd_cfg, bwd_cfg = best("fwd"), best("fwdbwd")
  fwd_fields = {f.name: getattr(fwd_cfg, f.name) for f in dataclasses.fields(fwd_cfg) if f.name.startswith("fwd_")}
  return dataclasses.replace(bwd_cfg, **fwd_fields)


def _write(path, report):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=1)


def _fmt(x):
  return f"{x:8.3f}" if isinstance(x, float) else "    FAIL"


def _print_table(report):
  print("\nL     pattern         dtype     floor_f  ours_f  floor_fb ours_fb  cudnn_f cudnn_fb")
  for r in report["rows"]:
    tri_f = min(
      (v for k, v in r.items() if k.startswith("triton_") and k.endswith("_fwd_ms") and isinstance(v, float)),
      default=None,
    )
    tri_fb = min(
      (v for k, v in r.items() if k.startswith("triton_") and k.endswith("_fwdbwd_ms") and isinstance(v, float)),
      default=None,
    )
    print(
      f"{r['L']:5d} {r['pattern']:15s} {r['dtype']:9s}",
      _fmt(r["tile_floor_fwd_ms"]),
      _fmt(tri_f),
      _fmt(r["tile_floor_fwdbwd_ms"]),
      _fmt(tri_fb),
      _fmt(r.get("cudnn_fwd_ms")),
      _fmt(r.get("cudnn_fwdbwd_ms")),
    )


if __name__ == "__main__":
  main()
