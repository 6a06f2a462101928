"""Where a profiled step's GPU time goes: kernel time by name, from a jax.profiler trace.

  python bench/profile_summary.py TRACE_DIR [--steps N] [--top 40] [--out summary.json]

Reads the trace's .xplane.pb with jax.profiler.ProfileData (no TensorBoard needed), sums the
duration of every event on each '/device:GPU:*' plane's stream lines by kernel name, and groups the
names into matmuls (cuBLAS / cutlass gemm kernels), attention (our Triton kernels), collectives
(NCCL) and the rest (XLA fusions: elementwise, reductions, copies). --steps divides the totals to
give time per step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os

import jax


def category(name: str) -> str:
  n = name.lower()
  if "nccl" in n:
    return "collectives"
  if "gemm" in n or "cublas" in n or "cutlass" in n or "sm90_xmma" in n or "nvjet" in n:
    return "matmul"
  if "_fwd_kernel" in n or "_bwd_" in n or "attn" in n or "attention" in n:
    return "attention"
  if "convolution" in n or "conv" in n:
    return "conv"
  if "copy" in n or "memcpy" in n or "memset" in n or "transpose" in n:
    return "copy"
  return "fusion/other"


def summarize(trace_dir: str, steps: int = 1, top: int = 40) -> dict:
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
  by_name: dict[str, float] = collections.Counter()
  count: dict[str, int] = collections.Counter()
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if "stream" not in line.name.lower():
        continue
      for ev in line.events:
        by_name[ev.name] += ev.duration_ns / 1e6
        count[ev.name] += 1
  total = sum(by_name.values())
  cats: dict[str, float] = collections.Counter()
  for name, ms in by_name.items():
    cats[category(name)] += ms
  return {
    "total_ms_per_step": round(total / steps, 3),
    "by_category_ms_per_step": {k: round(v / steps, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
    "top_kernels": [
      {
        "name": n[:160],
        "ms_per_step": round(ms / steps, 3),
        "calls_per_step": count[n] / steps,
        "category": category(n),
      }
      for n, ms in by_name.most_common(top)
    ],
  }


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("trace_dir")
  p.add_argument("--steps", type=int, default=1)
  p.add_argument("--top", type=int, default=40)
  p.add_argument("--out", default=None)
  a = p.parse_args()
  s = summarize(a.trace_dir, a.steps, a.top)
  print(json.dumps({k: v for k, v in s.items() if k != "top_kernels"}, indent=1))
  for k in s["top_kernels"]:
    print(f"{k['ms_per_step']:9.3f} ms {k['calls_per_step']:7.1f}x  {k['category']:12} {k['name'][:110]}")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(s, f, indent=1)


if __name__ == "__main__":
  main()
