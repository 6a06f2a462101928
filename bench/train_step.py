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

  first_step_s  process start -> first step finished (imports, tokenizer, sharded init, compile; the
                init and the step compile side by side, as in Trainer.fit, unless --sequential_start);
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

MAR and Hi-MAR (this project's JAX implementations, to set beside the official PyTorch step):

  python bench/train_step.py --settings mar:base:64,himar:base:64 --out bench/results/train_step_mar.json
  python bench/train_step.py --settings mar:tiny:8,himar:tiny:8 --steps 3 --out /tmp/mar_cpu.json   # any machine
  python bench/train_step.py --settings mar:base:64 --latents ...    # the latent-cache path, where it exists

kind mar / himar, variant tiny / base / large / huge: configs/mar.py or configs/himar.py (the official
recipe: AdamW (0.9, 0.95), weight decay 0.02, clip 3.0, EMA 0.9999, dropout 0.1, diffusion batch x4 (MAR)
/ x1 (Hi-MAR)) with bf16 compute, f32 parameters, a random kl16 KL VAE (frozen, in the state). Random
batches of exactly what the task's example_shapes() asks for: uint8 images and labels (the VAE encodes
them in the step, as the official training without its cache), or, with --latents (config.data
.latents_cache set to a dummy folder, where this version's schema has that key; a row records an error
otherwise), the cached VAE moments. No data source is opened. Reported as above, plus:

  step_flops    the model FLOPs of `mar_step_flops` (hmar_jax.training.flops counts only the scale
                transformers; the task's own count is used where it gives one): flops_source says which
  xla_flops     what XLA's cost analysis counts in the compiled step (everything: the frozen VAE's
                encoder, the heads on every row, the encoder's padded capacity)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

T_START = time.time()  # before JAX is imported: the start-up time counts from here
MAR_KINDS = ("mar", "himar")

BASE_BATCH = {
  ("base", 256): 64,
  ("large", 256): 32,
  ("huge", 256): 32,
  ("d16", 256): 64,
  ("d20", 256): 48,
  ("d24", 256): 32,
  ("d30", 256): 16,
  ("d16", 512): 16,
  ("d24", 512): 8,
}


def time_steps(step, state, batches: list, steps: int, profile: str | None):
  """Runs step(state, batch) once (its compile included, when step compiles on first call), twice to
  warm up, then `steps` times under the clock (and the profiler, with a trace folder); batches are
  cycled. Returns (state, metrics, the time the first step was done, seconds per timed step)."""
  import jax

  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics)
  t_first = time.time()
  for i in range(2):  # warm-up
    state, metrics = step(state, batches[(i + 1) % len(batches)])
  jax.block_until_ready(metrics)
  if profile:
    jax.profiler.start_trace(profile)
  t = time.time()
  for i in range(steps):
    state, metrics = step(state, batches[i % len(batches)])
  jax.block_until_ready(metrics)
  seconds = (time.time() - t) / steps
  if profile:
    jax.profiler.stop_trace()
  return state, metrics, t_first, seconds


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
  sequential_start: bool = False,
  autotune_level: int | None = None,
) -> dict:
  """Builds the trainer in this process, runs `steps` steps on random tokens; returns the figures.
  sequential_start: make the state, then compile the step (not side by side, as the trainer does).
  autotune_level: config.train.gpu_autotune_level (None: the config's)."""
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
  if autotune_level is not None:
    config.train.gpu_autotune_level = autotune_level
  if tokenizers and variant != "tiny":
    config.tokenizer.checkpoint = os.path.join(tokenizers, f"vae_{variant.partition('_')[2] or '256'}")
  t0 = time.time()
  trainer = Trainer(config, "/tmp/bench_train_step", devices=jax.devices()[:1])
  task = trainer.task
  t_build = time.time()
  seq = sum(p * p for p in task.patch_nums)

  def batch_of(i):
    r = np.random.default_rng(i)
    return trainer.global_batch(
      {
        "indices": r.integers(0, config.model.vocab_size, (batch, seq), dtype=np.int32),
        "labels": r.integers(0, config.model.num_classes, (batch,), dtype=np.int32),
      }
    )

  with trainer.mesh_context():
    batches = [batch_of(i) for i in range(4)]
    # Trainer.fit starts a fresh run with the step compiling while the state is made.
    state = trainer.init_state() if sequential_start else trainer.init_state_compiling_step(batches[0])
    jax.block_until_ready(state)
    t_init = time.time()
    step = trainer.compiled_step(batches[0])
    state, metrics, t_first, seconds = time_steps(step, state, batches, steps, profile)
  flops = task.step_flops(batch)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {
    "kind": kind,
    "variant": variant,
    "batch": batch,
    "attn": attn,
    # 'auto:none' / 'auto:dots': the policy remat 'auto' settled on (dots when the step did not fit)
    "remat": f"auto:{task.model_config.remat_policy.replace('auto', 'none')}" if remat == "auto" else remat,
    "scan_layers": scan,
    "dtype": config.model.dtype,
    "start": "sequential" if sequential_start else "overlapped",
    "gpu_autotune_level": int(config.train.gpu_autotune_level),  # -1: XLA's default
    "params_trained": n_params,
    **measured(batch, seconds, flops, metrics, (t0, t_build, t_init, t_first)),
  }


def _truncated_normal_mean(low: float, mean: float = 1.0, std: float = 0.25) -> float:
  """E[x] of N(mean, std) cut to [low, mean] (MAR's training mask ratio: mean 1, std 0.25)."""
  pdf = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)  # noqa: E731
  cdf = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))  # noqa: E731
  a = (low - mean) / std
  return mean + std * (pdf(a) - pdf(0.0)) / (cdf(0.0) - cdf(a))


def measured(batch: int, seconds: float, flops: float, metrics: dict, times: tuple) -> dict:
  """A setting's timing, throughput and memory fields: times = (t0, t_build, t_init, t_first), the
  process clock at the script's start of the setting, the trainer built, the state made, and the
  first step done; seconds per timed step; flops per step."""
  import jax

  from hmar_jax.training.metrics import peak_flops

  t0, t_build, t_init, t_first = times
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  peak = peak_flops(device.device_kind)
  return {
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


def mar_step_flops(task: str, m, batch: int) -> dict:
  """Model FLOPs of one MAR / Hi-MAR training step on `batch` images (forward + backward), by part.

  Each weight costs 6 FLOPs per token it sees (forward 2, backward 4) and attention 12 x width x depth
  x tokens^2 per sequence (QK^T and PV, forward + backward), with the expected token counts:

    MAR     encoder   6 P_enc T_enc + attention, T_enc = buffer + L (1 - E[r])
            decoder   6 P_dec T_dec + attention, T_dec = buffer + L
            MLP head  6 P_head x L E[r] x diffusion_batch_mul   (the masked tokens, repeated)
    Hi-MAR  stage 1   encoder T_enc = buffer + S (1 - E[r]); decoder T_dec = buffer + S + L (every slot);
                      MLP head over S E[r] x mul
            stage 2   encoder T_enc = buffer + S + L (1 - E[c]); decoder T_dec = buffer + S + L;
                      DiT head 6 P_dit x L x mul + its attention over the L tokens (it sees them all)

  P_enc / P_dec / P_head / P_dit: the parameters of the encoder blocks, decoder blocks, MLP head and DiT
  head of the abstract model (biases and norms included, embeddings and position tables not). L: the
  high-resolution tokens, S = cond_scale^2 the low-resolution ones, r: MAR's mask ratio (truncated
  normal, mean 1, std 0.25, on [mask_ratio_min, 1]: E[r] = 0.867 at 0.7), c: Hi-MAR's stage-2 ratio
  cos(pi u / 2), u ~ U[0, 1): E[c] = 2 / pi. Not counted: the frozen KL VAE's encoder (run forward on
  the images each step without a latent cache), embeddings, gathers, and the MLP head's unmasked rows
  (both the official code and this one run the head on all B L mul rows; the mask only weighs the loss).
  """
  import jax
  import numpy as np
  from flax import nnx

  from hmar_jax.models.mar import seq_len

  def params(module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))

  if task == "mar":
    from hmar_jax.models.mar_model import abstract_mar

    model = abstract_mar(m)
  else:
    from hmar_jax.models.himar_model import abstract_himar

    model = abstract_himar(m)
  bb = model.backbone
  p_enc = sum(params(b) for b in bb.encoder_blocks)
  p_dec = sum(params(b) for b in bb.decoder_blocks)
  p_head = params(model.diffloss)
  width_e, depth_e = int(m.encoder_embed_dim), int(m.encoder_depth)
  width_d, depth_d = int(m.decoder_embed_dim), int(m.decoder_depth)
  buf, n, mul = int(m.buffer_size), seq_len(m), int(m.diffusion_batch_mul)
  r = _truncated_normal_mean(float(m.mask_ratio_min))

  def transformer(p, width, depth, tokens):
    return 6.0 * p * tokens + 12.0 * width * depth * tokens * tokens

  parts = {}
  if task == "mar":
    parts["encoder"] = transformer(p_enc, width_e, depth_e, buf + n * (1.0 - r))
    parts["decoder"] = transformer(p_dec, width_d, depth_d, buf + n)
    parts["mlp_head"] = 6.0 * p_head * n * r * mul
  else:
    s = int(m.cond_scale) ** 2
    c = 2.0 / math.pi
    parts["stage1_encoder"] = transformer(p_enc, width_e, depth_e, buf + s * (1.0 - r))
    parts["stage1_decoder"] = transformer(p_dec, width_d, depth_d, buf + s + n)
    parts["stage1_mlp_head"] = 6.0 * p_head * s * r * mul
    parts["stage2_encoder"] = transformer(p_enc, width_e, depth_e, buf + s + n * (1.0 - c))
    parts["stage2_decoder"] = transformer(p_dec, width_d, depth_d, buf + s + n)
    parts["stage2_dit_head"] = mul * transformer(params(model.cond_diffloss), int(m.gdm_w), int(m.gdm_d), n)
  parts = {k: v * batch for k, v in parts.items()}
  return {"total": float(sum(parts.values())), "parts": {k: float(v) for k, v in parts.items()}}


def random_batch(shapes: dict, num_classes: int, batch: int, seed: int) -> dict:
  """A host batch of every field in `shapes` (the task's example_shapes): 'label' int32 class ids,
  'image' uint8 pixels (the loader's layout), any other field (cached VAE moments) float32 N(0, 0.5)."""
  import numpy as np

  r = np.random.default_rng(seed)
  out = {}
  for name, shape in shapes.items():
    if name == "label":
      out[name] = r.integers(0, num_classes, (batch, *shape), dtype=np.int32)
    elif name == "image":
      out[name] = r.integers(0, 256, (batch, *shape), dtype=np.uint8)
    else:
      out[name] = (0.5 * r.standard_normal((batch, *shape))).astype(np.float32)
  return out


def run_mar(kind: str, variant: str, batch: int, steps: int, latents: bool, profile: str | None) -> dict:
  """A MAR / Hi-MAR setting: the trainer built in this process, `steps` steps on random batches.

  latents: config.data.latents_cache set to an empty folder that lives as long as the setting (the
  bench feeds the batches; nothing is read from it)."""
  import tempfile

  with tempfile.TemporaryDirectory(prefix="bench_latents_") as dummy:
    return _run_mar(kind, variant, batch, steps, dummy if latents else None, profile)


def _run_mar(kind: str, variant: str, batch: int, steps: int, latents_dir: str | None, profile: str | None) -> dict:
  import jax
  import numpy as np

  from hmar_jax import config_utils
  from hmar_jax.training.schema import default_config
  from hmar_jax.training.trainer import Trainer

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_utils.load_config_file(os.path.join(root, "configs", f"{kind}.py:{variant}"))
  config.mesh.shape = (1, 1, 1)
  config.train.batch_size = batch
  config.train.num_steps = 10**6
  config.model.dtype = "bfloat16"
  config.data.source = "procedural"  # never read: random batches are fed directly
  config.data.num_examples = batch
  config.log.tensorboard = False
  config.sample.grid_at_end = False
  if latents_dir:
    if "latents_cache" not in default_config(kind).data:
      raise ValueError("--latents: this version's schema has no config.data.latents_cache (no cached path to time)")
    config.data.latents_cache = latents_dir
  t0 = time.time()
  trainer = Trainer(config, "/tmp/bench_train_step", devices=jax.devices()[:1])
  task = trainer.task
  if hasattr(task, "num_examples"):  # Hi-MAR's epoch clock: the dataset size without opening a data source
    task.num_examples = lambda: batch
  t_build = time.time()
  shapes = task.example_shapes()
  with trainer.mesh_context():
    state = trainer.init_state()
    jax.block_until_ready(state)
    t_init = time.time()
    batches = [trainer.global_batch(random_batch(shapes, int(config.model.class_num), batch, i)) for i in range(4)]
    compiled = trainer.compiled_step(batches[0]).lower(state, batches[0]).compile()
    state, metrics, t_first, seconds = time_steps(compiled, state, batches, steps, profile)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost["flops"]) if cost and "flops" in cost else None
  counted = mar_step_flops(kind, config.model, batch)
  task_flops = task.step_flops(batch)
  flops = float(task_flops) if task_flops else counted["total"]
  return {
    "kind": kind,
    "variant": variant,
    "batch": batch,
    "latents": bool(latents_dir),
    "batch_fields": {k: list(v) for k, v in shapes.items()},
    "remat": "grad_checkpointing" if config.model.grad_checkpointing else "none",
    "scan_layers": None,
    "dtype": config.model.dtype,
    "diffusion_batch_mul": int(config.model.diffusion_batch_mul),
    "params_trained": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
    **measured(batch, seconds, flops, metrics, (t0, t_build, t_init, t_first)),
    "flops_source": "task" if task_flops else "bench",
    "step_flops_by_part": counted["parts"],
    "xla_flops": xla_flops,
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
  if kind in MAR_KINDS:  # no block layout, remat policy or attention choice: MAR's config has none of them
    common = ["--steps", str(a.steps)] + (["--latents"] if a.latents else [])
  else:
    layout = layout or ("list" if a.no_scan else None)
    remat = remat or a.remat
    common = (
      ["--steps", str(a.steps), "--attn", a.attn]
      + (["--remat", remat] if remat else [])
      + (["--layout", layout] if layout else [])
    )

  def one(b, profile=None):
    extra = (
      (["--profile", profile] if profile else [])
      + (["--tokenizers", a.tokenizers] if a.tokenizers else [])
      + (["--sequential_start"] if a.sequential_start else [])
      + (["--autotune_level", str(a.autotune_level)] if a.autotune_level is not None else [])
    )
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
  p.add_argument(
    "--latents",
    action="store_true",
    help="mar / himar: time the latent-cache path (config.data.latents_cache set to a dummy folder, batches of "
    "VAE moments) where this version's schema has it",
  )
  p.add_argument(
    "--sequential_start",
    action="store_true",
    help="hmar / var: make the state, then compile the step (default: side by side, as Trainer.fit does)",
  )
  p.add_argument(
    "--autotune_level",
    type=int,
    default=None,
    choices=(-1, 0, 1, 2, 3, 4),
    help="hmar / var: config.train.gpu_autotune_level (XLA's autotuning of the step on CUDA; -1: XLA's default); "
    "default: the config's",
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
    if kind in MAR_KINDS:
      row = run_mar(kind, variant, int(batch), a.steps, a.latents, a.profile)
      print("RESULT " + json.dumps(row), flush=True)
      return
    scan = None if a.layout is None else a.layout == "scan"
    row = run_one(
      kind,
      variant,
      int(batch),
      a.steps,
      a.attn,
      a.remat,
      scan,
      a.profile,
      a.tokenizers,
      a.sequential_start,
      a.autotune_level,
    )
    print("RESULT " + json.dumps(row), flush=True)
    return
  if a.tokenizers:  # in a process of its own: this one must not hold the device while settings run
    subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--make_tokenizers", "--tokenizers", a.tokenizers],
      check=True,
      timeout=a.timeout,
    )
  settings = []
  for setting in a.settings.split(","):  # every setting checked before the first one runs
    kind, variant, batch, *rest = setting.split(":")
    if kind in MAR_KINDS and rest:
      p.error(f"setting {setting!r}: mar / himar settings are kind:variant:batch (no block layout or remat policy)")
    if kind in MAR_KINDS and (a.remat or a.no_scan):
      p.error("--remat and --no_scan apply to hmar / var settings only")
    if kind in MAR_KINDS and variant not in ("tiny", "base", "large", "huge"):
      p.error(f"setting {setting!r}: {kind} variant must be one of tiny, base, large, huge")
    settings.append((kind, variant, batch, rest))
  rows = []
  for kind, variant, batch, rest in settings:
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
      print(head + f"error: {(r['error'].strip().splitlines() or ['?'])[-1][:90]}")
    else:
      blocks = "-" if r["scan_layers"] is None else ("scan" if r["scan_layers"] else "list")
      print(
        head + f"{blocks:6} {r['remat']:13} {r['ms']:8.1f} {r['img_s']:7.1f} "
        f"{(r['mfu'] or 0):6.1%} {r['peak_gib']:8.1f} {r['first_step_s']:12.1f}"
      )
  mar_rows = [r for r in rows if r["kind"] in MAR_KINDS and "error" not in r]
  if mar_rows:
    print(
      f"\n{'kind':5} {'variant':8} {'batch':>5} {'latents':7} {'GFLOP/step':>11} {'XLA GFLOP':>10}  model FLOPs by part"
    )
    for r in mar_rows:
      parts = " ".join(f"{k} {v / r['step_flops']:.0%}" for k, v in r["step_flops_by_part"].items())
      xla = "-" if r["xla_flops"] is None else f"{r['xla_flops'] / 1e9:.1f}"
      print(
        f"{r['kind']:5} {r['variant']:8} {r['batch']:>5} {str(r['latents']):7} {r['step_flops'] / 1e9:11.1f} "
        f"{xla:>10}  {parts}"
      )


def write(a, rows) -> None:
  with open(a.out, "w") as f:
    json.dump(
      {
        "what": "full train steps through the shared trainer (bench/train_step.py)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": a.settings,
        "steps": a.steps,
        "latents": a.latents,
        "rows": rows,
      },
      f,
      indent=1,
    )


if __name__ == "__main__":
  main()
