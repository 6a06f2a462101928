"""Full training steps through the shared trainer: images/s, MFU, peak memory, time to first step.

  python bench/train_step.py --settings hmar:d16:64,hmar:d24:32,hmar:d16_512:16,var:d16:64,var:d24:32 \
      --out bench/results/train_step.json
  python bench/train_step.py --settings hmar:d24:max --out big.json        # the largest batch that fits
  python bench/train_step.py --settings hmar:d24:32:list:none,hmar:d24:32:scan:dots   # block layout, remat

Each setting runs in its own process (clean peak-memory figures and a true start-up time): the
official-recipe config (configs/hmar.py or configs/var.py, bf16 compute, f32 parameters, scanned
blocks, the block-sparse attention kernels under shard_map) on one device, random token maps
through the real step: teacher-forcing inputs from the tokenizer's quantizer, forward, backward,
global-norm clipping 2.0, AdamW, per-scale loss weights. Reported per setting:

  first_step_s  process start -> first step finished (imports, tokenizer, sharded init, compile);
                with --tokenizers the tokenizer is loaded from a checkpoint, as a user's converted
                one is, rather than initialised at random
  ms            mean step time over --steps pipelined steps (one block at the end, as in training)
  img_s         batch / step time
  mfu           step FLOPs / step time / peak (FLOPs: hmar_jax.training.flops, the shared anchors'
                count; peak: dense bf16 of the device, hmar_jax.training.metrics.PEAK_BF16_FLOPS)
  peak_gib      the device allocator's peak bytes in use

'max' as the batch: measures the setting's base batch (the official-comparison one) and twice it,
takes the memory per image from the two, and runs the largest multiple of 8 predicted to fit in
90% of the device's memory (stepping down by an eighth if that fails).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

T_START = time.time()  # before JAX is imported: the start-up time counts from here

BASE_BATCH = {("d16", 256): 64, ("d20", 256): 48, ("d24", 256): 32, ("d30", 256): 16, ("d16", 512): 16, ("d24", 512): 8}


def make_tokenizers(directory: str) -> None:
  """Random official-architecture tokenizers (256 and 512 px) saved as checkpoints, as a user's
  converted one would be: the settings then load one instead of initialising 100M weights."""
  import jax
  from flax import nnx

  from hmar_jax.tokenizer.config import vqvae_config
  from hmar_jax.tokenizer.vqvae import VQVAE, save_vqvae

  for res in ("256", "512"):
    path = os.path.join(directory, f"vae_{res}")
    if not os.path.exists(path):
      key = jax.random.key(0, impl="rbg")
      save_vqvae(path, nnx.jit(lambda res=res, key=key: VQVAE(vqvae_config(res), rngs=nnx.Rngs(key)))())


def run_one(
  kind: str,
  variant: str,
  batch: int,
  steps: int,
  attn: str,
  remat: str | None,
  scan: bool | None,
  profile: str | None,
  tokenizers: str | None = None,
) -> dict:
  """Builds the trainer in this process, runs `steps` steps on random tokens; returns the figures."""
  import jax
  import numpy as np

  from hmar_jax import config_utils
  from hmar_jax.training.trainer import Trainer

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_utils.load_config_file(os.path.join(root, "configs", f"{kind}.py:{variant}"))
  config.mesh.shape = (1, 1, 1)
  config.train.batch_size = batch
  config.train.num_steps = 10**6
  config.model.attn_implementation = attn
  if remat is not None:
    config.model.remat_policy = remat
  if scan is not None:
    config.model.scan_layers = scan
  remat, scan = config.model.remat_policy, config.model.scan_layers
  config.data.source = "procedural"  # never read: random tokens are fed directly
  config.data.num_examples = batch
  config.log.tensorboard = False
  if tokenizers and variant != "tiny":
    config.tokenizer.checkpoint = os.path.join(tokenizers, f"vae_{variant.partition('_')[2] or '256'}")
  t0 = time.time()
  trainer = Trainer(config, "/tmp/bench_train_step", devices=jax.devices()[:1])
  task = trainer.task
  t_build = time.time()
  with trainer.mesh_context():
    state = trainer.init_state()
    jax.block_until_ready(state)
    t_init = time.time()
    rng = np.random.default_rng(0)
    seq = sum(p * p for p in task.patch_nums)

    def batch_of(i):
      r = np.random.default_rng(i)
      return trainer.global_batch(
        {
          "indices": r.integers(0, config.model.vocab_size, (batch, seq), dtype=np.int32),
          "labels": r.integers(0, config.model.num_classes, (batch,), dtype=np.int32),
        }
      )

    batches = [batch_of(i) for i in range(4)]
    step = trainer.compiled_step(batches[0])
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    t_first = time.time()
    for i in range(2):  # warm-up
      state, metrics = step(state, batches[(i + 1) % 4])
    jax.block_until_ready(metrics)
    if profile:
      jax.profiler.start_trace(profile)
    t = time.time()
    for i in range(steps):
      state, metrics = step(state, batches[i % 4])
    jax.block_until_ready(metrics)
    seconds = (time.time() - t) / steps
    if profile:
      jax.profiler.stop_trace()
  del rng
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  flops = task.step_flops(batch)
  from hmar_jax.training.metrics import peak_flops

  peak = peak_flops(device.device_kind)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {
    "kind": kind,
    "variant": variant,
    "batch": batch,
    "attn": attn,
    "remat": remat,
    "scan_layers": scan,
    "dtype": config.model.dtype,
    "params_trained": n_params,
    "start_to_trainer_s": round(t_build - T_START, 2),
    "trainer_build_s": round(t_build - t0, 2),
    "state_init_s": round(t_init - t_build, 2),
    "compile_and_first_step_s": round(t_first - t_init, 2),
    "first_step_s": round(t_first - T_START, 2),
    "ms": round(1000 * seconds, 2),
    "img_s": round(batch / seconds, 1),
    "step_flops": flops,
    "tflops": round(flops / seconds / 1e12, 1),
    "mfu": round(flops / seconds / peak, 4) if peak else None,
    "peak_flops": peak,
    "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
    "device_memory_gib": round(stats.get("bytes_limit", 0) / 2**30, 2),
    "loss": float(metrics["loss"]),
    "device": device.device_kind,
    "jax": jax.__version__,
  }


def _child(args_list: list[str], timeout: int) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", *args_list]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s"}
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout)[-1500:]
    oom = "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
    return {"error": "out of memory" if oom else tail}
  return json.loads(lines[-1][len("RESULT ") :])


def measure(kind, variant, batch, a, layout=None, remat=None) -> list[dict]:
  layout = layout or ("list" if a.no_scan else None)
  remat = remat or a.remat
  common = (
    ["--steps", str(a.steps), "--attn", a.attn]
    + (["--remat", remat] if remat else [])
    + (["--layout", layout] if layout else [])
  )

  def one(b, profile=None):
    extra = (["--profile", profile] if profile else []) + (["--tokenizers", a.tokenizers] if a.tokenizers else [])
    row = _child(["--one", f"{kind}:{variant}:{b}", *common, *extra], a.timeout)
    row.setdefault("kind", kind), row.setdefault("variant", variant), row.setdefault("batch", b)
    print(json.dumps(row), flush=True)
    return row

  if batch != "max":
    return [one(int(batch), a.profile)]
  name, _, res = variant.partition("_")
  base = BASE_BATCH.get((name, int(res or 256)), 32)
  rows = [one(base), one(2 * base)]
  r1, r2 = rows
  if "error" in r1 or "error" in r2:
    return rows
  per_image = (r2["peak_gib"] - r1["peak_gib"]) / base
  fixed = r1["peak_gib"] - per_image * base
  budget = 0.9 * r1["device_memory_gib"]
  b = int((budget - fixed) / per_image) // 8 * 8
  row = one(b)
  rows.append(row)
  if "error" in row:
    rows.append(one(int(b * 7 / 8) // 8 * 8))
  for r in rows:
    r["batch_search"] = {
      "per_image_gib": round(per_image, 4),
      "fixed_gib": round(fixed, 2),
      "budget_gib": round(budget, 1),
    }
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
    "--settings",
    default="hmar:d16:64,hmar:d24:32,hmar:d16_512:16,var:d16:64,var:d24:32",
    help="kind:variant:batch[:scan|list[:remat policy]], comma-separated (batch 'max': the "
    "largest that fits); layout and remat default to --no_scan / --remat",
  )
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--attn", default="auto", help="attention implementation (auto: triton on CUDA)")
  p.add_argument("--remat", default=None, help="remat policy (default: the config's)")
  p.add_argument("--no_scan", action="store_true", help="a list of blocks instead of the config's layout")
  p.add_argument("--layout", default=None, choices=("scan", "list"), help=argparse.SUPPRESS)
  p.add_argument("--timeout", type=int, default=420, help="seconds per setting")
  p.add_argument("--profile", default=None, help="write a jax.profiler trace of the timed steps here")
  p.add_argument(
    "--tokenizers",
    default=None,
    help="folder of tokenizer checkpoints vae_256 / vae_512 (made with random weights if missing); "
    "default: each setting initialises a random tokenizer itself (slower start)",
  )
  p.add_argument("--out", default=None)
  p.add_argument("--make_tokenizers", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.make_tokenizers:
    make_tokenizers(a.tokenizers)
    return
  if a.child:
    kind, variant, batch = a.one.split(":")
    scan = None if a.layout is None else a.layout == "scan"
    row = run_one(kind, variant, int(batch), a.steps, a.attn, a.remat, scan, a.profile, a.tokenizers)
    print("RESULT " + json.dumps(row), flush=True)
    return
  if a.tokenizers:  # in a process of its own: this one must not hold the device while settings run
    subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--make_tokenizers", "--tokenizers", a.tokenizers],
      check=True,
      timeout=a.timeout,
    )
  rows = []
  for setting in a.settings.split(","):
    kind, variant, batch, *rest = setting.split(":")
    rows += measure(kind, variant, batch, a, *rest)
    if a.out:  # after every setting: a run stopped early keeps what it measured
      write(a, rows)
  print(
    f"\n{'kind':5} {'variant':8} {'batch':>5} {'blocks':6} {'remat':13} {'ms':>8} {'img/s':>7} {'MFU':>6} "
    f"{'peak GiB':>8} {'first step s':>12}"
  )
  for r in rows:
    head = f"{r['kind']:5} {r['variant']:8} {r['batch']:>5} "
    if "error" in r:
      print(head + f"error: {r['error'][:60]}")
    else:
      print(
        head + f"{'scan' if r['scan_layers'] else 'list':6} {r['remat']:13} {r['ms']:8.1f} {r['img_s']:7.1f} "
        f"{(r['mfu'] or 0):6.1%} {r['peak_gib']:8.1f} {r['first_step_s']:12.1f}"
      )


def write(a, rows) -> None:
  with open(a.out, "w") as f:
    json.dump(
      {
        "what": "full train steps through the shared trainer (bench/train_step.py)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": a.settings,
        "steps": a.steps,
        "rows": rows,
      },
      f,
      indent=1,
    )


if __name__ == "__main__":
  main()
