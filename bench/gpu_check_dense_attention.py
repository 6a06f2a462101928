"""cuDNN's fused attention in the MAR / Hi-MAR backbones and the DiT head, on a GPU.

1. Correctness: `dense_attention(..., implementation='cudnn')` forward and dQ/dK/dV against a float64
   NumPy reference on the same rounded inputs (bfloat16 / float16; MAR-B/L/H and DiT head shapes,
   per-row key lengths as the encoder makes them), beside the XLA path's own error.
2. A MAR-B backbone (random weights, bfloat16): z with every Attention on 'cudnn' against 'xla'.
3. Speed: one attention call at the sampler's shapes (MAR-B with guidance: 128 rows x 320 tokens x
   12 heads; the Hi-MAR-B DiT head: 128 x 256 x 8 heads), XLA against cuDNN.

  python bench/gpu_check_dense_attention.py --out bench/results/gpu_check_dense_attention.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hmar_jax.models.dense_attention import dense_attention  # noqa: E402

TOL = 2e-2  # max |error| / max |reference|, bfloat16 / float16 inputs and outputs
CASES = [  # (name, batch, tokens, heads, head_dim, with key lengths)
  ("mar_b_encoder", 4, 320, 12, 64, True),
  ("mar_l_decoder", 2, 320, 16, 64, False),
  ("mar_h_encoder", 2, 320, 16, 80, True),
  ("dit_head_b", 4, 256, 8, 64, False),
]


def reference(q, k, v, lengths, d_out):
  """float64 output and (dq, dk, dv) of softmax(q k^T / sqrt(D)) v with keys >= lengths[b] left out."""
  scale = q.shape[-1] ** -0.5
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if lengths is not None:
    s = np.where((np.arange(k.shape[1])[None, :] < lengths[:, None])[:, None, None, :], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p, v)
  dp = np.einsum("bqhd,bkhd->bhqk", d_out, v)
  dv = np.einsum("bhqk,bqhd->bkhd", p, d_out)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * scale
  dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
  return out, (dq, dk, dv)


def rel(x, ref) -> float:
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def check_case(name, b, n, h, d, with_lengths, dtype, seed) -> dict:
  rng = np.random.default_rng(seed)
  q, k, v, g = (jnp.asarray(rng.standard_normal((b, n, h, d)), dtype) for _ in range(4))
  lengths = jnp.asarray(rng.integers(n // 5, n + 1, size=b), jnp.int32) if with_lengths else None
  row = {"case": name, "dtype": jnp.dtype(dtype).name, "shape": [b, n, h, d], "key_lengths": with_lengths}
  rq, rk, rv, rg = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v, g))
  ref, ref_grads = reference(rq, rk, rv, None if lengths is None else np.asarray(lengths), rg)
  for impl in ("cudnn", "xla"):
    f = jax.jit(lambda q, k, v, impl=impl: dense_attention(q, k, v, kv_lengths=lengths, implementation=impl))
    out, vjp = jax.vjp(f, q, k, v)
    grads = jax.jit(vjp)(g)
    row[impl] = {"out": rel(out, ref)} | {n_: rel(x, r) for n_, x, r in zip(("dq", "dk", "dv"), grads, ref_grads)}
  row["ok"] = all(e <= TOL for e in row["cudnn"].values())
  return row


def check_backbone() -> dict:
  from flax import nnx

  from hmar_jax.models import mar

  c = mar.mar_config("base")
  c.dtype = "bfloat16"
  c.attn_implementation = "xla"
  model = mar.MARBackbone(c, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  b, n = 8, model.seq_len
  tokens = jnp.asarray(rng.standard_normal((b, n, model.token_embed_dim)), jnp.float32)
  mask = jnp.asarray(rng.random((b, n)) < np.linspace(0.3, 0.95, b)[:, None])
  labels = jnp.asarray(rng.integers(0, 1000, b), jnp.int32)
  run = nnx.jit(lambda m, t, mk, y: m(t, mk, y, capacity=model.buffer_size + n))
  z_xla = np.asarray(run(model, tokens, mask, labels), np.float64)
  for _, module in nnx.iter_graph(model):
    if isinstance(module, mar.Attention):
      module.implementation = "cudnn"
  z_cudnn = np.asarray(run(model, tokens, mask, labels), np.float64)
  err = float(np.abs(z_cudnn - z_xla).max() / np.abs(z_xla).max())
  return {
    "what": "MAR-B backbone z, bf16, random weights, batch 8, mask ratios 0.3-0.95",
    "rel_err_cudnn_vs_xla": err,
    "ok": err <= TOL,
  }


def time_case(name, b, n, h, d, with_lengths, repeats=20) -> dict:
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.bfloat16) for _ in range(3))
  lengths = jnp.asarray(rng.integers(n // 3, n + 1, size=b), jnp.int32) if with_lengths else None
  row = {"case": name, "shape": [b, n, h, d], "dtype": "bfloat16"}
  for impl in ("xla", "cudnn"):
    f = jax.jit(lambda q, k, v, impl=impl: dense_attention(q, k, v, kv_lengths=lengths, implementation=impl))
    jax.block_until_ready(f(q, k, v))
    t0 = time.perf_counter()
    for _ in range(repeats):
      out = f(q, k, v)
    jax.block_until_ready(out)
    row[f"{impl}_ms"] = round(1e3 * (time.perf_counter() - t0) / repeats, 4)
  row["speedup"] = round(row["xla_ms"] / row["cudnn_ms"], 2)
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=None)
  a = p.parse_args()
  rows = [
    check_case(*case, dtype, seed)
    for seed, (case, dtype) in enumerate((c, dt) for c in CASES for dt in (jnp.bfloat16, jnp.float16))
  ]
  for r in rows:
    print(
      f"{r['case']:15s} {r['dtype']:9s} cudnn "
      + " ".join(f"{k} {v:.1e}" for k, v in r["cudnn"].items())
      + "  | xla "
      + " ".join(f"{k} {v:.1e}" for k, v in r["xla"].items())
      + ("" if r["ok"] else "  FAIL")
    )
  backbone = check_backbone()
  print(f"MAR-B backbone z: cudnn vs xla rel err {backbone['rel_err_cudnn_vs_xla']:.2e}")
  timings = [
    time_case("mar_b_sampling_encoder", 128, 320, 12, 64, True),
    time_case("mar_b_sampling_decoder", 128, 320, 12, 64, False),
    time_case("himar_b_dit_head", 128, 256, 8, 64, False),
  ]
  for t in timings:
    print(f"{t['case']:24s} xla {t['xla_ms']:.3f} ms  cudnn {t['cudnn_ms']:.3f} ms  x{t['speedup']}")
  result = {
    "what": "cuDNN fused attention (jax.nn.dot_product_attention) against float64 NumPy and XLA's attention",
    "date": datetime.date.today().isoformat(),
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "tolerance": TOL,
    "cases": rows,
    "backbone": backbone,
    "timings": timings,
    "all_ok": all(r["ok"] for r in rows) and backbone["ok"],
  }
  print("all ok" if result["all_ok"] else "SOME CHECKS FAILED")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
