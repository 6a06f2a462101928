"""The sampler: time to first images, where the first call's time goes, steady-state images/s, peak memory.

  python bench/sample.py --settings hmar:d16:64,var:d16:64,hmar:d24:64,var:d24:64,hmar:d16_512:16,hmar:d16_1024:4 \
      --out bench/results/sample.json
  python bench/sample.py --settings hmar:tiny:4 --out /tmp/sample_cpu.json            # any machine

Each setting runs in its own process (a true start-up time, a clean peak-memory figure): the
official-architecture model of configs/hmar_mask.py (HMAR with its masked-prediction branch, the
official default mask schedule at 256 px, next-scale only at other sizes) or configs/var.py (KV
cache), random weights N(0, 0.02) saved as a checkpoint and loaded as a converted one is (blocks in
the scan layout), the official tokenizer architecture with random weights, bf16, guidance 1.5,
top-k 900, top-p 0.96, decoding included. Reported per setting:

  build_s          process start -> model and tokenizer loaded from their checkpoints
  first_images_s   process start -> the first batch of images on the host (compilation included)
  precompile_s     Sampler.precompile: every program of a run compiled side by side in threads
                   (--no_precompile: off, each compiles when first called)
  first_call_s     the first Sampler.sample call, precompile included; compile_s: the time JAX's
                   compile-time events add up to (over threads), by piece
  ms, img_s        a batch's time and images/s over --repeats calls after the first
  scale_ms         one steady-state call's time per scale (each piece synchronised: an upper bound)
  peak_gib         the device allocator's peak bytes in use (GPU / TPU)
  cached_first_images_s   with --cached: a second measuring process reading JAX's persistent
                   compilation cache that the first one wrote (the rerun a user makes)

The setting inception:-:BATCH times evaluation feature extraction instead: the evaluator's
InceptionV3 (random weights) on 256 x 256 uint8 images, TF1 resize to 299 included, images/s.

1024 px uses patch_nums (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

T_START = time.time()  # before JAX is imported: the start-up time counts from here
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def _config(kind: str, variant: str):
  """The training config of the setting's model: 'd16', 'd16_512' (the configs' variants), 'd16_1024'."""
  from hmar_jax import config_utils
  from hmar_jax.tokenizer.config import vqvae_config

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  name = "hmar_mask" if kind == "hmar" else "var"
  base, _, res = variant.partition("_")
  config = config_utils.load_config_file(
    os.path.join(root, "configs", f"{name}.py:{base if res == '1024' else variant}")
  )
  if res == "1024":
    config.model.patch_nums = PATCH_NUMS_1024
    config.tokenizer.config = vqvae_config("1024")
  return config


def run_inception(batch: int, repeats: int) -> dict:
  import jax
  import numpy as np
  from flax import nnx

  from hmar_jax.evaluation.features import FeatureExtractor
  from hmar_jax.evaluation.inception import InceptionV3

  extractor = FeatureExtractor(InceptionV3(rngs=nnx.Rngs(0)), batch)
  images = np.random.default_rng(0).integers(0, 256, (extractor.batch_size, 256, 256, 3), dtype=np.uint8)
  t0 = time.time()
  extractor.run(images)
  first_call_s = time.time() - t0
  times = []
  for _ in range(repeats):
    t0 = time.time()
    extractor.run(images)  # host copies of the features included, as in evaluation
    times.append(time.time() - t0)
  ms = 1e3 * float(np.median(times))
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "kind": "inception",
    "variant": "256px_uint8",
    "batch": extractor.batch_size,
    "first_call_s": round(first_call_s, 2),
    "ms": round(ms, 2),
    "img_s": round(extractor.batch_size / (ms / 1e3), 2),
    "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2) if stats else None,
    "device": jax.devices()[0].device_kind,
  }


def run_one(kind: str, variant: str, batch: int, repeats: int, workdir: str, precompile: bool = True) -> dict:
  if kind == "inception":
    return run_inception(batch, repeats)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from hmar_jax import checkpoint
  from hmar_jax.models.transformer import ScaleTransformer
  from hmar_jax.sample import load_transformer
  from hmar_jax.sampling import Sampler
  from hmar_jax.tokenizer.vqvae import VQVAE, load_vqvae, save_vqvae

  config = _config(kind, variant)
  mc = config.model
  schedule = "default" if kind == "hmar" and tuple(mc.patch_nums) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) else "none"
  if variant == "tiny":
    schedule = str(config.sample.mask_schedule)
  params_dir, vae_dir = os.path.join(workdir, "params"), os.path.join(workdir, "vae")
  if not os.path.exists(params_dir):  # random weights saved once, as converted official ones would be
    rng = np.random.default_rng(0)

    def random(ctor, std):
      graphdef, state = nnx.split(nnx.eval_shape(ctor))
      return nnx.merge(
        graphdef, jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype), state)
      )

    checkpoint.save_params(
      params_dir, random(lambda: ScaleTransformer(mc, rngs=nnx.Rngs(0)), 0.02), metadata={"model": mc.to_dict()}
    )
    save_vqvae(vae_dir, random(lambda: VQVAE(config.tokenizer.config, rngs=nnx.Rngs(0)), 0.02))
    return {"prepared": True}
  compile_s: dict[str, float] = {}

  def on_event(event, duration, **kwargs):  # JAX's monitoring: backend compile durations, by function
    if "backend_compile" in event:
      name = kwargs.get("fun_name", "?")
      compile_s[name] = compile_s.get(name, 0.0) + duration

  jax.monitoring.register_event_duration_secs_listener(on_event)
  model = load_transformer(params_dir)
  vqvae = load_vqvae(vae_dir)
  build_s = time.time() - T_START
  sampler = Sampler(model, vqvae)
  labels = jnp.asarray(np.arange(batch) % max(1, model.num_classes), jnp.int32)
  kw = dict(cfg=1.5, top_k=900, top_p=0.96, mask_schedule=schedule)
  t0 = time.time()
  precompiled = sampler.precompile(labels, **kw) if precompile else 0  # the programs side by side
  precompile_s = time.time() - t0
  np.asarray(sampler.sample(labels, 0, **kw))
  first_call_s = time.time() - t0
  first_images_s = time.time() - T_START
  times = []
  for r in range(repeats):
    t0 = time.time()
    np.asarray(sampler.sample(labels, r + 1, **kw))
    times.append(time.time() - t0)
  ms = 1e3 * float(np.median(times))
  # Per scale: the same call with every piece synchronised (dispatch gaps included).
  scale_ms = []
  t_prev = time.time()
  original = sampler._compiled

  def timed(name, fn, static_argnames=()):
    f = original(name, fn, static_argnames)

    def call(*a, **k):
      nonlocal t_prev
      out = jax.block_until_ready(f(*a, **k))
      if name == "update":
        scale_ms.append(1e3 * (time.time() - t_prev))
        t_prev = time.time()
      return out

    return call

  sampler._compiled = timed
  t_prev = time.time()
  _, f_hat = sampler.sample_indices(labels, repeats + 1, **kw)
  t0 = time.time()
  jax.block_until_ready(sampler.decode(f_hat))
  decode_ms = 1e3 * (time.time() - t0)
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "kind": kind,
    "variant": variant,
    "batch": batch,
    "mask_schedule": schedule,
    "scan_layers": bool(model.scan_layers),
    "build_s": round(build_s, 2),
    "precompile_s": round(precompile_s, 2),
    "precompiled_programs": precompiled,
    "first_call_s": round(first_call_s, 2),
    "first_images_s": round(first_images_s, 2),
    "compile_s": round(sum(compile_s.values()), 2),
    "compile_s_by_function": {k: round(v, 2) for k, v in sorted(compile_s.items(), key=lambda kv: -kv[1])},
    "ms": round(ms, 2),
    "img_s": round(batch / (ms / 1e3), 2),
    "scale_ms": [round(x, 2) for x in scale_ms],
    "decode_ms": round(decode_ms, 2),
    "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2) if stats else None,
    "device": jax.devices()[0].device_kind,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--settings", required=True, help="kind:variant:batch, comma-separated (variant d16, d16_512, ...)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=None)
  p.add_argument("--no_precompile", action="store_true", help="compile each program when first called")
  p.add_argument("--cached", action="store_true", help="also time a rerun reading the persistent compilation cache")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # kind:variant:batch:workdir (child process)
  a = p.parse_args()
  if a.one:
    kind, variant, batch, workdir = a.one.split(":", 3)
    row = run_one(
      kind,
      variant,
      int(batch),
      a.repeats,
      workdir,
      **({} if kind == "inception" else {"precompile": not a.no_precompile}),
    )
    print("RESULT " + json.dumps(row), flush=True)
    return
  rows = []
  for setting in a.settings.split(","):
    kind, variant, batch = setting.split(":")
    with tempfile.TemporaryDirectory(prefix="hmar_bench_sample_") as workdir:
      row = None
      # The first process writes the random checkpoints, the second measures (compiling cold and, with
      # --cached, filling JAX's persistent cache), the third measures a rerun reading that cache.
      runs = 1 if kind == "inception" else (3 if a.cached else 2)
      env = dict(os.environ)
      if a.cached:
        env.update(
          JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, "jax_cache"),
          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
          JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
      for i in range(runs):
        cmd = [sys.executable, __file__, "--settings", setting, "--repeats", str(a.repeats)]
        cmd += ["--no_precompile"] if a.no_precompile else []
        cmd += ["--one", f"{kind}:{variant}:{batch}:{workdir}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env if i else os.environ)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
          row = {"kind": kind, "variant": variant, "batch": int(batch), "error": proc.stderr.strip()[-1500:]}
          break
        result = json.loads(lines[-1][7:])
        if i == 2:
          row["cached_first_images_s"] = result["first_images_s"]
          row["cached_compile_s"] = result["compile_s"]
        else:
          row = result
    rows.append(row)
    if "error" in row:
      print(f"{kind} {variant} batch {batch}: error: {row['error'].splitlines()[-1] if row['error'] else '?'}")
    elif kind == "inception":
      print(f"inception features batch {row['batch']}: {row['ms']:.1f} ms/batch, {row['img_s']:.1f} img/s", flush=True)
    else:
      cached = f", rerun {row['cached_first_images_s']:.1f} s" if "cached_first_images_s" in row else ""
      print(
        f"{kind:4} {variant:9} batch {row['batch']:3}: first images {row['first_images_s']:6.1f} s (build "
        f"{row['build_s']:.1f}, compile {row['compile_s']:.1f}{cached}), {row['ms']:8.1f} ms/batch, "
        f"{row['img_s']:8.1f} img/s, peak {row['peak_gib']} GiB",
        flush=True,
      )
    if a.out:
      import jax

      with open(a.out, "w") as f:
        json.dump(
          {
            "what": "hmar_jax sampler (bench/sample.py)",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "jax": jax.__version__,
            "rows": rows,
          },
          f,
          indent=1,
        )


if __name__ == "__main__":
  main()
