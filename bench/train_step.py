"""Throughput of the next-scale forward + backward (random inputs, no optimiser).

  python bench/train_step.py --depth 16 --batch 64 --dtype bfloat16 --attn xla,auto

Prints one JSON line per setting: compile seconds, median ms per step, images/s, peak device
memory. The step is value_and_grad of the mean token cross-entropy of `nsp_logits` (train mode:
class dropout and drop path on), i.e. a train step without the optimiser update.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.models import ScaleTransformer, count_params, model_config


def measure(depth: int, batch: int, dtype: str, attn: str, steps: int, kind: str, remat: bool) -> dict:
  m = model_config(depth, kind=kind)
  m.dtype, m.attn_implementation, m.remat = dtype, attn, remat
  model = nnx.jit(lambda: ScaleTransformer(m, rngs=nnx.Rngs(0)))()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(0)
  seq = sum(p * p for p in m.patch_nums)
  labels = jnp.asarray(rng.integers(0, m.num_classes, batch), jnp.int32)
  teacher = jnp.asarray(rng.standard_normal((batch, seq - 1, m.cvae)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, m.vocab_size, (batch, seq)), jnp.int32)

  @jax.jit
  def step(params, key):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p, rest).nsp_logits(labels, teacher, train=True, key=key)
      logp = jax.nn.log_softmax(logits, axis=-1)
      return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()
    return jax.value_and_grad(loss_fn)(params)

  key = jax.random.key(0)
  t0 = time.perf_counter()
  jax.block_until_ready(step(params, key))
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, jax.random.fold_in(key, i)))
    times.append(time.perf_counter() - t0)
  ms = 1000 * float(np.median(times))
  stats = jax.devices()[0].memory_stats() or {}
  return {"kind": kind, "depth": depth, "batch": batch, "dtype": dtype, "attn": attn, "remat": remat,
          "params_next_scale": count_params(model, exclude_mask_branch=True), "compile_s": round(compile_s, 1),
          "ms": round(ms, 2), "img_s": round(1000 * batch / ms, 1),
          "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
          "device": jax.devices()[0].device_kind}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--depth", type=int, default=16)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--attn", default="xla", help="comma-separated attention implementations")
  p.add_argument("--kind", default="hmar")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--remat", action="store_true")
  a = p.parse_args()
  for attn in a.attn.split(","):
    print(json.dumps(measure(a.depth, a.batch, a.dtype, attn, a.steps, a.kind, a.remat)), flush=True)


if __name__ == "__main__":
  main()
