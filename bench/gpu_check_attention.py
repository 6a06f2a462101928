"""Correctness of the Triton (CUDA) scale-attention kernels on a GPU, against float64 NumPy.

The same comparisons as tests/test_attention_pallas.py: forward and dQ/dK/dV on the 256 / 512 /
1024 px layouts and a seeded sweep of random small layouts, both patterns, float32 / bfloat16 /
float16, head dim 64 and 128, every output buffer NaN-filled before the kernels run (aliased), so
an unwritten element fails the check. Fresh random inputs per case.

  python bench/gpu_check_attention.py --out bench/results/gpu_check_attention.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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

from bench.attention import VARIANTS  # noqa: E402
from pallas_kernels import patterns, reference, triton_gpu  # noqa: E402

LAYOUTS = {
  "256px": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
  "512px": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
  "1024px": (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
TOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}


def _rel(x, ref):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  return float(np.abs(x - ref).max() / np.abs(ref).max())


def check_case(pn, pattern, batch, heads, head_dim, dtype, seed, grads=True, config=None, variant="default"):
  length = patterns.sequence_length(pn)
  config = dataclasses.replace(config or triton_gpu.config_for_length(length), poison_outputs=True)
  rng = np.random.default_rng(seed)
  q, k, v, g = (rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32) for _ in range(4))
  cast = lambda x: jnp.asarray(x, dtype)
  qd, kd, vd, gd = map(cast, (q, k, v, g))
  scale = head_dim**-0.5
  f = jax.jit(lambda q, k, v: triton_gpu.scale_attention_triton(q, k, v, pn, pattern, scale=scale, config=config))
  # The reference sees the same rounded inputs as the kernel.
  rq, rk, rv, rg = (np.asarray(x.astype(jnp.float32), np.float64) for x in (qd, kd, vd, gd))
  if grads:
    out, vjp = jax.vjp(f, qd, kd, vd)
    got = jax.jit(vjp)(gd)
    ref, ref_grads = reference.numpy_attention_f64(rq, rk, rv, pn, pattern, scale=scale, d_out=rg)
    errs = {"out": _rel(out, ref)}
    errs.update({n: _rel(x, r) for n, x, r in zip(("dq", "dk", "dv"), got, ref_grads)})
  else:
    out = f(qd, kd, vd)
    ref = reference.numpy_attention_f64(rq, rk, rv, pn, pattern, scale=scale)
    errs = {"out": _rel(out, ref)}
  tol = TOL[jnp.dtype(dtype).name]
  worst = float(np.max(list(errs.values())))  # NaN-propagating, unlike max()
  return dict(
    variant=variant,
    patch_nums=list(pn),
    L=length,
    pattern=pattern,
    B=batch,
    H=heads,
    D=head_dim,
    dtype=jnp.dtype(dtype).name,
    errors=errs,
    tol=tol,
    passed=bool(np.isfinite(worst) and worst < tol),
  )


def quick_cases():
  """The shipped per-length configs on the three layouts, bfloat16 (a short device call)."""
  for name in ("256px", "512px", "1024px"):
    for pattern in patterns.PATTERNS:
      big = name == "1024px"
      yield dict(
        pn=LAYOUTS[name], pattern=pattern, batch=1 if big else 2, heads=1 if big else 2, head_dim=64, dtype=jnp.bfloat16
      )


def variant_cases(names):
  """Each named bench/attention.py tile config on a ragged layout per pattern (bf16, float32)."""
  for name in names:
    cfg = VARIANTS[name][0]
    for pn, pattern, dtype, heads in (
      (LAYOUTS["256px"], "block_diagonal", jnp.bfloat16, 2),
      (LAYOUTS["512px"], "block_causal", jnp.bfloat16, 2),
      (LAYOUTS["512px"], "block_diagonal", jnp.float16, 2),
      (LAYOUTS["256px"], "block_causal", jnp.float32, 2),
      (LAYOUTS["1024px"], "block_causal", jnp.bfloat16, 1),
    ):
      yield dict(pn=pn, pattern=pattern, batch=1, heads=heads, head_dim=64, dtype=dtype, config=cfg, variant=name)


def cases():
  for name in ("256px", "512px"):
    for pattern in patterns.PATTERNS:
      for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        yield dict(pn=LAYOUTS[name], pattern=pattern, batch=2, heads=2, head_dim=64, dtype=dtype)
    yield dict(pn=LAYOUTS[name], pattern="block_causal", batch=1, heads=2, head_dim=128, dtype=jnp.bfloat16)
  for pattern in patterns.PATTERNS:
    yield dict(pn=LAYOUTS["1024px"], pattern=pattern, batch=1, heads=1, head_dim=64, dtype=jnp.bfloat16)
  rng = np.random.default_rng(7)
  for i in range(8):
    pn = tuple(int(p) for p in np.sort(rng.integers(1, 12, size=rng.integers(1, 7))))
    yield dict(
      pn=pn,
      pattern=patterns.PATTERNS[i % 2],
      batch=int(rng.integers(1, 3)),
      heads=int(rng.integers(1, 4)),
      head_dim=int(rng.choice([64, 128])),
      dtype=[jnp.float32, jnp.bfloat16][i % 2],
    )


def _write(path, report):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="bench/results/gpu_check_attention.json")
  parser.add_argument("--quick", action="store_true", help="shipped configs, bfloat16 only")
  parser.add_argument(
    "--variants", default="", help="comma list of bench/attention.py configs to check ('all': every one)"
  )
  args = parser.parse_args()
  report = dict(
    device=str(jax.devices()[0].device_kind),
    jax=jax.__version__,
    python=platform.python_version(),
    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
  )
  try:
    # Optional (CUDA): the report records their versions, or why they did not import.
    import jax_triton
    import triton

    report.update(jax_triton=jax_triton.__version__, triton=triton.__version__)
  except Exception as e:  # pylint: disable=broad-except
    report["import_error"] = repr(e)
  results = []
  names = (
    [n for n in VARIANTS if VARIANTS[n][0] is not None]
    if args.variants == "all"
    else [n for n in args.variants.split(",") if n]
  )
  todo = itertools.chain(quick_cases() if args.quick else cases(), variant_cases(names))
  for seed, case in enumerate(todo):
    t0 = time.time()
    try:
      res = check_case(seed=seed, **case)
    except Exception as e:  # pylint: disable=broad-except
      res = dict(
        L=patterns.sequence_length(case["pn"]),
        pattern=case["pattern"],
        dtype=jnp.dtype(case["dtype"]).name,
        D=case["head_dim"],
        case={k: str(v) for k, v in case.items()},
        passed=False,
        error=f"{type(e).__name__}: {e}"[:2000],
        trace=traceback.format_exc()[-3000:],
      )
    res["seconds"] = round(time.time() - t0, 1)
    results.append(res)
    _write(args.out, dict(report, cases=results, complete=False))
    detail = res["error"][:300] if "error" in res else res["errors"]
    print(
      "PASS" if res["passed"] else "FAIL",
      case.get("variant", "default"),
      res.get("L"),
      res.get("pattern"),
      res.get("dtype"),
      res.get("D"),
      detail,
      res["seconds"],
      "s",
      flush=True,
    )
  report.update(cases=results, complete=True, all_passed=all(r["passed"] for r in results))
  _write(args.out, report)
  print("ALL PASSED" if report["all_passed"] else "SOME FAILED", f"({len(results)} cases)")


if __name__ == "__main__":
  main()
