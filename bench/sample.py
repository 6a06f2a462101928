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

  build_s          process start -> the sampler made (hmar_jax.sample.sampler_from_checkpoints: the
                   model and tokenizer built as shapes from their checkpoints' configs, their weights
                   read in a background thread while precompile runs); build_phases_s splits it:
                   imports, backend (device start-up), abstract_models; load_s: the background
                   thread's model_load and tokenizer_load (side by side). With
                   --no_background_load the weights are read first, in build phase 'load'.
  first_images_s   process start -> the first batch of images on the host (compilation included)
  precompile_s     Sampler.precompile: every program of a run compiled side by side in threads
                   (--no_precompile: off, each compiles when first called)
  first_call_s     the first Sampler.sample call, precompile included; compile_s: the time JAX's
                   compile-time events add up to (over threads), by piece
  ms, img_s        a batch's time and images/s over --repeats calls after the first
  scale_ms         one steady-state call's time per scale (each piece synchronised: an upper bound),
                   from the start of the scale's next-scale step (which first adds the scale
                   before it to f_hat) to the start of the next scale's
  peak_gib         the device allocator's peak bytes in use (GPU / TPU)
  cached_first_images_s   with --cached: a second measuring process reading JAX's persistent
                   compilation cache that the first one wrote (the rerun a user makes)
  cached_peak_gib  with --cached: that rerun's peak, which compiles nothing, so holds none of the
                   compiler's autotuning buffers (peak_gib does)
  cached_run       with --cached: that rerun's start-up fields (build phases, load_s, timeline_s,
                   precompile_s, first_call_s, first_images_s)
  timeline_s       seconds since process start at which tracing ended (traced), the background
                   load started and ended (load_started, load_done) and its weights were swapped
                   into the sampler (weights_in)
  precompile_report  Sampler.precompile_report: programs, whether they were read from the sampler's
                   program cache (hmar_jax/sampling/program_cache.py, inside JAX's persistent cache
                   with --cached, as sampler_from_checkpoints keeps it), seconds reading, tracing
                   and compiling
  program_cache_write_s  the cold run's write of its programs to that cache (a background thread)

MAR and Hi-MAR (this project's JAX implementations, to set beside the official PyTorch samplers):

  python bench/sample.py --settings mar:base:64:s64,mar:base:64:s256,himar:base:64 --out bench/results/sample_mar.json
  python bench/sample.py --settings mar:tiny:2:s4,himar:tiny:2 --out /tmp/sample_mar_cpu.json    # any machine

kind:variant:batch[:sSTEPS] with kind mar or himar, variant tiny / base / large / huge (configs/mar.py,
configs/himar.py), STEPS the mask steps (MAR num_iter, default 256, the official evaluation; Hi-MAR the
stage-2 steps, default the config's: 4 for Hi-MAR-B). Random weights N(0, 0.02) saved with save_mar /
save_himar and loaded with load_mar / load_himar as a converted checkpoint is, bf16 compute, a random KL
VAE of the model's architecture (kl16 at 256 px) saved and loaded with save_kl_vae / load_kl_vae, its
decoding included (float32, as the official decode). The official evaluation settings: MAR-B / L / H cfg
2.9 / 3.0 / 3.2, linear cfg schedule, temperature 1.0, the head's 100 diffusion steps per token;
Hi-MAR-B / L / H stage 1 4 x cond_scale = 32 steps (MLP head, 100 diffusion steps, re_cfg 2.7 / 3.5 /
5.5), stage 2 STEPS steps (DiT head, 250 diffusion steps, cfg 2.5 / 3.5 / 3.2), linear schedule,
temperature 1.0 (tiny: MAR cfg 2.9, Hi-MAR the tiny config's sample section). Reported as the HMAR rows
(build_s, first_images_s, compile_s, ms, img_s, peak_gib; precompile_s when the sampler has a
`precompile`), and instead of scale_ms:

  piece_ms         one more call with every compiled piece synchronised (an upper bound of each):
                   MAR backbone / head / decode, Hi-MAR stage1_backbone / stage1_head /
                   stage2_backbone / stage2_head / decode, 'other' the rest (gathers, writes, dispatch)
  piece_calls      how many times each piece ran in that call

The setting inception:-:BATCH times evaluation feature extraction instead: the evaluator's
InceptionV3 (random weights) on 256 x 256 uint8 images, TF1 resize to 299 included, images/s.

1024 px uses patch_nums (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64).
"""

from __future__ import annotations

import argparse
import concurrent.futures
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
MAR_KINDS = ("mar", "himar")
# The rerun's (--cached) start-up, kept whole: where its first-images time goes.
CACHED_RUN_FIELDS = (
  "build_phases_s",
  "load_s",
  "timeline_s",
  "precompile_s",
  "precompile_report",
  "first_call_s",
  "first_images_s",
)
MAR_VARIANTS = ("tiny", "base", "large", "huge")
MAR_NUM_ITER = 256  # the official MAR evaluation (main_mar.py --num_iter 256)
MAR_CFG = {"tiny": 2.9, "base": 2.9, "large": 3.0, "huge": 3.2}  # official MAR README evaluation
# The compiled pieces of each sampler (attribute of the jitted function) timed by piece_ms.
MAR_PIECES = {"backbone": "backbone_jit", "head": "head_jit", "decode": "decode_jit"}
HIMAR_PIECES = {
  "stage1_backbone": "stage1_jit",
  "stage1_head": "head1_jit",
  "stage2_backbone": "stage2_jit",
  "stage2_head": "head2_jit",
  "decode": "decode_jit",
}


def parse_setting(setting: str) -> tuple[str, str, int, int | None]:
  """(kind, variant, batch, steps) of 'kind:variant:batch[:sSTEPS]' (steps only for mar / himar).

  Raises ValueError naming the problem (before any process starts)."""
  parts = setting.strip().split(":")
  if len(parts) not in (3, 4):
    raise ValueError(f"setting {setting!r}: expected kind:variant:batch or, for mar / himar, kind:variant:batch:sSTEPS")
  kind, variant, batch = parts[:3]
  if kind not in ("hmar", "var", "inception", *MAR_KINDS):
    raise ValueError(f"setting {setting!r}: unknown kind {kind!r} (hmar, var, inception, mar, himar)")
  if not batch.isdigit() or int(batch) < 1:
    raise ValueError(f"setting {setting!r}: batch must be an integer >= 1, got {batch!r}")
  steps = None
  if kind in MAR_KINDS and variant not in MAR_VARIANTS:
    raise ValueError(f"setting {setting!r}: {kind} variant must be one of {', '.join(MAR_VARIANTS)}, got {variant!r}")
  if len(parts) == 4:
    if kind not in MAR_KINDS:
      raise ValueError(f"setting {setting!r}: a step count (:sSTEPS) is for mar / himar settings only")
    text = parts[3]
    if not (text.startswith("s") and text[1:].isdigit() and int(text[1:]) >= 1):
      raise ValueError(f"setting {setting!r}: the step count must be s followed by an integer >= 1, got {text!r}")
    steps = int(text[1:])
  return kind, variant, int(batch), steps


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


def compile_timer() -> dict[str, float]:
  """A dict that JAX's monitoring fills with backend compile seconds, by function name, from now on."""
  import jax

  compile_s: dict[str, float] = {}

  def on_event(event, duration, **kwargs):
    if "backend_compile" in event:
      name = kwargs.get("fun_name", "?")
      compile_s[name] = compile_s.get(name, 0.0) + duration

  jax.monitoring.register_event_duration_secs_listener(on_event)
  return compile_s


class BuildClock:
  """Seconds spent in each start-up phase, each counted from the end of the previous one (the first
  from process start): where a setting's build_s goes."""

  def __init__(self):
    self.phases: dict[str, float] = {}
    self._last = T_START

  def mark(self, phase: str) -> None:
    now = time.time()
    self.phases[phase] = round(now - self._last, 2)
    self._last = now


def time_sampler(sampler, labels, kw: dict, repeats: int, precompile: bool):
  """The first sample call (after `sampler.precompile` when asked: every program compiled side by
  side), then `repeats` timed calls with seeds 1.. . Returns (programs precompiled or None,
  precompile s, first call s (precompile included), first images s since process start, the repeats'
  seconds, their median in ms)."""
  import numpy as np

  t0 = time.time()
  precompiled = sampler.precompile(labels, **kw) if precompile else None
  precompile_s = time.time() - t0
  np.asarray(sampler.sample(labels, 0, **kw))
  first_call_s = time.time() - t0
  first_images_s = time.time() - T_START
  times = []
  for r in range(repeats):
    t0 = time.time()
    np.asarray(sampler.sample(labels, r + 1, **kw))
    times.append(time.time() - t0)
  return precompiled, precompile_s, first_call_s, first_images_s, times, 1e3 * float(np.median(times))


def start_fields(
  clock: BuildClock, precompile_s, precompiled, first_call_s, first_images_s, compile_s: dict, ms
) -> dict:
  """A sampler setting's start-up fields (build and its phases, precompile, first call, compile time
  by function) and its steady-state ms per batch."""
  return {
    "build_s": round(sum(clock.phases.values()), 2),
    "build_phases_s": dict(clock.phases),
    "precompile_s": round(precompile_s, 2),
    "precompiled_programs": precompiled,
    "first_call_s": round(first_call_s, 2),
    "first_images_s": round(first_images_s, 2),
    "compile_s": round(sum(compile_s.values()), 2),
    "compile_s_by_function": {k: round(v, 2) for k, v in sorted(compile_s.items(), key=lambda kv: -kv[1])},
    "ms": round(ms, 2),
  }


def _random_module_maker():
  """random(ctor, std): the module `ctor` builds, made abstractly (no random-init program is compiled)
  and filled with N(0, std) drawn on the host."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  rng = np.random.default_rng(0)

  def random(ctor, std):
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype), state))

  return random


def _mar_config(kind: str, variant: str, attn: str = "auto"):
  """The training config of configs/mar.py or configs/himar.py at `variant`, bf16 compute, attention
  implementation `attn` (hmar_jax/models/dense_attention.py)."""
  from hmar_jax import config_utils

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_utils.load_config_file(os.path.join(root, "configs", f"{kind}.py:{variant}"))
  config.model.dtype = "bfloat16"
  config.model.attn_implementation = attn
  return config


def mar_sample_kwargs(kind: str, variant: str, steps: int | None, config) -> dict:
  """The official evaluation settings of the setting's model (module docstring)."""
  if kind == "mar":
    num_iter = MAR_NUM_ITER if steps is None else steps
    return dict(num_iter=num_iter, cfg=MAR_CFG[variant], cfg_schedule="linear", temperature=1.0)
  s = config.sample  # configs/himar.py: the official README's (num_iter, cfg, re_cfg) per variant
  num_iter = int(s.num_iter) if steps is None else steps
  return dict(num_iter=num_iter, cfg=float(s.cfg), re_cfg=float(s.re_cfg), cfg_schedule="linear", temperature=1.0)


def _prepare_mar(kind: str, config, workdir: str) -> None:
  """Random model and KL VAE checkpoints of the setting (written once, by the first process)."""
  from flax import nnx

  from hmar_jax.models.himar_model import HiMARModel, save_himar
  from hmar_jax.models.mar_model import MARModel, save_mar
  from hmar_jax.tokenizer.kl_vae import KLVAE, save_kl_vae

  random = _random_module_maker()
  model_class, save = (MARModel, save_mar) if kind == "mar" else (HiMARModel, save_himar)
  save(os.path.join(workdir, "params"), random(lambda: model_class(config.model, rngs=nnx.Rngs(0)), 0.02), config.model)
  vae = random(lambda: KLVAE(config.tokenizer.config, rngs=nnx.Rngs(0)), 0.02)
  save_kl_vae(os.path.join(workdir, "vae"), vae)


def _timed_pieces(sampler, pieces: dict[str, str]):
  """Replaces the sampler's jitted pieces by synchronised, timed ones; returns (spent ms, calls, restore).

  Each piece's inputs are waited for before its clock starts, so the time of the work queued before it
  (token writes, gathers) is not counted against it."""
  import jax

  spent = {name: 0.0 for name in pieces}
  calls = {name: 0 for name in pieces}
  originals = {name: getattr(sampler, attr) for name, attr in pieces.items()}

  def wrap(name, f):
    def call(*args, **kwargs):
      jax.block_until_ready(args)
      t0 = time.time()
      out = jax.block_until_ready(f(*args, **kwargs))
      spent[name] += 1e3 * (time.time() - t0)
      calls[name] += 1
      return out

    return call

  for name, attr in pieces.items():
    setattr(sampler, attr, wrap(name, originals[name]))

  def restore():
    for name, attr in pieces.items():
      setattr(sampler, attr, originals[name])

  return spent, calls, restore


def run_mar(
  kind: str,
  variant: str,
  batch: int,
  steps: int | None,
  repeats: int,
  workdir: str,
  precompile: bool = True,
  attn: str = "auto",
  profile: str | None = None,
) -> dict:
  """A MAR or Hi-MAR setting in this process (the random checkpoints written first if missing);
  with `profile`, one more call is traced there (jax.profiler; bench/profile_summary.py reads it)."""
  config = _mar_config(kind, variant, attn)
  if not os.path.exists(os.path.join(workdir, "params")):
    _prepare_mar(kind, config, workdir)
    return {"prepared": True}
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from hmar_jax.tokenizer.kl_vae import load_kl_vae

  clock = BuildClock()
  clock.mark("imports")
  jax.devices()
  clock.mark("backend")
  compile_s = compile_timer()
  if kind == "mar":
    from hmar_jax.models.mar_model import load_mar
    from hmar_jax.sampling.mar_generate import MARSampler as sampler_class

    model = load_mar(os.path.join(workdir, "params"))
    pieces = MAR_PIECES
  else:
    from hmar_jax.models.himar_model import load_himar
    from hmar_jax.sampling.himar_generate import HiMARSampler as sampler_class

    model = load_himar(os.path.join(workdir, "params"))
    pieces = HIMAR_PIECES
  clock.mark("model_load")
  vae = load_kl_vae(os.path.join(workdir, "vae"))
  clock.mark("tokenizer_load")
  sampler = sampler_class(model, vae)
  labels = jnp.asarray(np.arange(batch) % sampler.num_classes, jnp.int32)
  kw = mar_sample_kwargs(kind, variant, steps, config)
  precompiled, precompile_s, first_call_s, first_images_s, times, ms = time_sampler(
    sampler, labels, kw, repeats, precompile and hasattr(sampler, "precompile")
  )
  spent, calls, restore = _timed_pieces(sampler, pieces)
  t0 = time.time()
  np.asarray(sampler.sample(labels, repeats + 1, **kw))
  total_ms = 1e3 * (time.time() - t0)
  restore()
  profiled_ms = None
  if profile:
    with jax.profiler.trace(profile):
      t0 = time.time()
      np.asarray(sampler.sample(labels, repeats + 2, **kw))
      profiled_ms = round(1e3 * (time.time() - t0), 2)
  piece_ms = {k: round(v, 2) for k, v in spent.items()}
  piece_ms["other"] = round(total_ms - sum(spent.values()), 2)
  stats = jax.devices()[0].memory_stats() or {}
  m = config.model
  return {
    "kind": kind,
    "variant": variant,
    "batch": batch,
    "steps": kw["num_iter"],
    "sampling": kw,
    # diffusion steps per sample of each head (Hi-MAR's DiT head: the official 250, whatever the MLP head's)
    "diffusion_steps": {"mlp_head": int(m.num_sampling_steps)}
    | ({"dit_head": int(m.gdm_num_sampling_steps)} if kind == "himar" else {}),
    "dtype": str(m.dtype),
    "attn_implementation": str(m.attn_implementation),
    "params": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
    **start_fields(clock, precompile_s, precompiled, first_call_s, first_images_s, compile_s, ms),
    "ms_repeats": [round(1e3 * t, 2) for t in times],
    "img_s": round(batch / (ms / 1e3), 2),
    "piece_ms": piece_ms,
    "piece_calls": calls,
    "synchronised_ms": round(total_ms, 2),
    **({"profiled_ms": profiled_ms, "profile": profile} if profile else {}),
    "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2) if stats else None,
    "device": jax.devices()[0].device_kind,
  }


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


def _level(text: str) -> int | None:
  """--autotune_level's value as Sampler's gpu_autotune_level ('xla' -> None)."""
  return None if text == "xla" else int(text)


def run_one(
  kind: str,
  variant: str,
  batch: int,
  repeats: int,
  workdir: str,
  precompile: bool = True,
  autotune: str = "default",
  background_load: bool = True,
  load_start: str = "traced",
  program_cache: bool = True,
) -> dict:
  if kind == "inception":
    return run_inception(batch, repeats)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from hmar_jax import checkpoint
  from hmar_jax.device_warmup import start_device_warmup
  from hmar_jax.models.transformer import ScaleTransformer
  from hmar_jax.sample import abstract_transformer, load_transformer
  from hmar_jax.sampling import Sampler
  from hmar_jax.sampling.program_cache import default_program_cache_dir
  from hmar_jax.tokenizer.vqvae import VQVAE, abstract_vqvae_of_checkpoint, load_vqvae, save_vqvae

  config = _config(kind, variant)
  mc = config.model
  schedule = "default" if kind == "hmar" and tuple(mc.patch_nums) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) else "none"
  if variant == "tiny":
    schedule = str(config.sample.mask_schedule)
  params_dir, vae_dir = os.path.join(workdir, "params"), os.path.join(workdir, "vae")
  if not os.path.exists(params_dir):  # random weights saved once, as converted official ones would be
    random = _random_module_maker()
    checkpoint.save_params(
      params_dir, random(lambda: ScaleTransformer(mc, rngs=nnx.Rngs(0)), 0.02), metadata={"model": mc.to_dict()}
    )
    save_vqvae(vae_dir, random(lambda: VQVAE(config.tokenizer.config, rngs=nnx.Rngs(0)), 0.02))
    return {"prepared": True}
  clock = BuildClock()
  clock.mark("imports")
  jax.devices()
  clock.mark("backend")
  compile_s = compile_timer()
  options = {} if autotune == "default" else {"gpu_autotune_level": _level(autotune)}
  # as sampler_from_checkpoints: inside JAX's persistent cache, which only --cached turns on here
  options["program_cache"] = default_program_cache_dir() if program_cache else None
  load_s = {}
  timeline = {}  # seconds since process start at which each event happened

  def load():  # what sampler_from_checkpoints reads in its background thread (both at once), timed
    timeline["load_started"] = round(time.time() - T_START, 2)

    def timed(name, read, path):
      t0 = time.time()
      out = read(path)
      load_s[name] = round(time.time() - t0, 2)
      return out

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      model = pool.submit(timed, "model_load", load_transformer, params_dir)
      vqvae = pool.submit(timed, "tokenizer_load", load_vqvae, vae_dir)
      out = model.result(), vqvae.result()
    timeline["load_done"] = round(time.time() - T_START, 2)
    return out

  if background_load:  # as hmar_jax.sample.sampler_from_checkpoints, with the loads timed
    start_device_warmup()
    sampler = Sampler(abstract_transformer(params_dir), abstract_vqvae_of_checkpoint(vae_dir), **options)
    sampler.load_weights_in_background(load)
    if load_start == "start":  # the experiment: read while tracing too, not only while compiling
      sampler._start_pending()
    clock.mark("abstract_models")
  else:
    sampler = Sampler(*load(), **options)
    clock.mark("load")
  lower_all = sampler._lower_all

  def lower_all_timed(*args):
    out = lower_all(*args)
    timeline["traced"] = round(time.time() - T_START, 2)
    return out

  sampler._lower_all = lower_all_timed
  swap_in = sampler._swap_in_pending

  def swap_in_timed():
    pending = sampler._pending is not None
    swap_in()
    if pending:
      timeline["weights_in"] = round(time.time() - T_START, 2)

  sampler._swap_in_pending = swap_in_timed
  labels = jnp.asarray(np.arange(batch) % max(1, sampler.num_classes), jnp.int32)
  timeline["labels_on_device"] = round(time.time() - T_START, 2)
  kw = dict(cfg=1.5, top_k=900, top_p=0.96, mask_schedule=schedule)
  precompiled, precompile_s, first_call_s, first_images_s, times, ms = time_sampler(
    sampler, labels, kw, repeats, precompile
  )
  precompiled = precompiled or 0
  # Per scale: the same call with every piece synchronised (dispatch gaps included). Scale si runs
  # from the start of its next-scale step (which first adds scale si - 1 to f_hat) to the start of
  # the next one; the last scale ends with its own update.
  scale_ms = []
  t_prev = time.time()
  original = sampler._compiled

  def timed(name, fn, static_argnames=(), donate_argnames=()):
    f = original(name, fn, static_argnames, donate_argnames)

    def call(*a, **k):
      nonlocal t_prev
      if name in ("nsp", "nsp_cached") and k.get("si"):
        scale_ms.append(1e3 * (time.time() - t_prev))
        t_prev = time.time()
      out = jax.block_until_ready(f(*a, **k))
      if name == "update":
        scale_ms.append(1e3 * (time.time() - t_prev))
      return out

    return call

  sampler._compiled = timed
  t_prev = time.time()
  _, f_hat = sampler.sample_indices(labels, repeats + 1, **kw)
  t0 = time.time()
  jax.block_until_ready(sampler.decode(f_hat))
  decode_ms = 1e3 * (time.time() - t0)
  written = sampler._program_cache_write
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "kind": kind,
    "variant": variant,
    "batch": batch,
    "mask_schedule": schedule,
    "scan_layers": True,  # load_transformer's layout for sampling, whatever the checkpoint's
    "gpu_autotune_level": sampler.gpu_autotune_level,  # None: XLA's default
    "gpu_triton_gemm": sampler.gpu_triton_gemm,  # None: XLA's default
    "background_load": background_load,
    "load_start": load_start if background_load else None,
    "load_s": load_s,  # in the background thread while precompiling when background_load
    "timeline_s": timeline,  # since process start: tracing done, background load started and done
    "precompile_report": {k: round(v, 2) if isinstance(v, float) else v for k, v in sampler.precompile_report.items()},
    "program_cache_write_s": round(w, 2) if written and (w := written.result()) is not None else None,
    **start_fields(clock, precompile_s, precompiled, first_call_s, first_images_s, compile_s, ms),
    "img_s": round(batch / (ms / 1e3), 2),
    "scale_ms": [round(x, 2) for x in scale_ms],
    "decode_ms": round(decode_ms, 2),
    "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2) if stats else None,
    "device": jax.devices()[0].device_kind,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
    "--settings",
    required=True,
    help="kind:variant:batch (hmar / var: d16, d16_512, ...; inception:-:B) or kind:variant:batch[:sSTEPS] "
    "(mar / himar: tiny, base, large, huge), comma-separated",
  )
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=None)
  p.add_argument("--no_precompile", action="store_true", help="compile each program when first called")
  p.add_argument(
    "--no_background_load",
    action="store_true",
    help="hmar / var: read the weights before compiling (default: in a thread while precompiling, as "
    "hmar_jax.sample does)",
  )
  p.add_argument("--cached", action="store_true", help="also time a rerun reading the persistent compilation cache")
  p.add_argument("--timeout", type=int, default=None, help="seconds per process of a setting (default: none)")
  p.add_argument(
    "--mar_attn",
    default="auto",
    choices=("auto", "xla", "cudnn"),
    help="mar / himar: the backbones' and DiT head's attention (auto: cuDNN's fused attention on a GPU)",
  )
  p.add_argument("--profile", default=None, help="mar / himar: trace one more call into this folder")
  p.add_argument(
    "--autotune_level",
    default="default",
    help="hmar / var: the Sampler's gpu_autotune_level, 0-4 or 'xla' (XLA's own default); "
    "default: the Sampler's default",
  )
  p.add_argument(
    "--load_start",
    choices=("traced", "start"),
    default="traced",
    help="when the background load starts: once precompile has traced the programs (the Sampler's way), "
    "or at once, beside the tracing",
  )
  p.add_argument(
    "--no_program_cache",
    action="store_true",
    help="hmar / var: keep no program cache (with --cached the rerun then traces every program again)",
  )
  p.add_argument("--child_logs", default=None, help="keep each measuring process's stderr in this folder")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # kind:variant:batch:workdir (child process)
  p.add_argument("--num_iter", type=int, default=None, help=argparse.SUPPRESS)  # mar / himar steps (child)
  a = p.parse_args()
  if a.one:
    kind, variant, batch, workdir = a.one.split(":", 3)
    if kind in MAR_KINDS:
      row = run_mar(
        kind,
        variant,
        int(batch),
        a.num_iter,
        a.repeats,
        workdir,
        precompile=not a.no_precompile,
        attn=a.mar_attn,
        profile=a.profile,
      )
    else:
      row = run_one(
        kind,
        variant,
        int(batch),
        a.repeats,
        workdir,
        **(
          {}
          if kind == "inception"
          else {
            "precompile": not a.no_precompile,
            "autotune": a.autotune_level,
            "background_load": not a.no_background_load,
            "load_start": a.load_start,
            "program_cache": not a.no_program_cache,
          }
        ),
      )
    print("RESULT " + json.dumps(row), flush=True)
    return
  if a.repeats < 1:
    p.error(f"--repeats must be >= 1, got {a.repeats}")
  try:  # every setting checked before the first one runs
    settings = [(text, *parse_setting(text)) for text in a.settings.split(",")]
  except ValueError as e:
    p.error(str(e))
  rows = []
  for setting, kind, variant, batch, steps in settings:
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
        cmd += ["--no_background_load"] if a.no_background_load else []
        cmd += ["--load_start", a.load_start]
        cmd += ["--no_program_cache"] if a.no_program_cache else []
        cmd += ["--num_iter", str(steps)] if steps is not None else []
        cmd += ["--mar_attn", a.mar_attn, "--autotune_level", a.autotune_level]
        cmd += ["--profile", a.profile] if a.profile and i == runs - 1 else []
        cmd += ["--one", f"{kind}:{variant}:{batch}:{workdir}"]
        try:
          proc = subprocess.run(cmd, capture_output=True, text=True, env=env if i else os.environ, timeout=a.timeout)
          if a.child_logs and i:
            os.makedirs(a.child_logs, exist_ok=True)
            with open(os.path.join(a.child_logs, f"{setting.replace(':', '_')}_run{i}.log"), "w") as log:
              log.write(proc.stderr)
        except subprocess.TimeoutExpired:
          row = {"kind": kind, "variant": variant, "batch": batch, "error": f"timed out after {a.timeout} s"}
          break
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
          tail = proc.stderr.strip()[-1500:]
          oom = "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
          row = {"kind": kind, "variant": variant, "batch": batch, "error": ("out of memory: " if oom else "") + tail}
          break
        result = json.loads(lines[-1][7:])
        if i == 2:
          row["cached_first_images_s"] = result["first_images_s"]
          row["cached_compile_s"] = result["compile_s"]
          # this process compiled nothing (no GEMM / conv autotuning): the programs' own peak
          row["cached_peak_gib"] = result["peak_gib"]
          row["cached_run"] = {k: result.get(k) for k in CACHED_RUN_FIELDS}
        else:
          row = result
    row["setting"] = setting
    rows.append(row)
    print_row(row)
    if a.out:
      write(a, rows)
  print_table(rows)


def print_row(row: dict) -> None:
  kind, variant, batch = row["kind"], row["variant"], row["batch"]
  if "error" in row:
    print(f"{kind} {variant} batch {batch}: error: {row['error'].splitlines()[-1] if row['error'] else '?'}")
  elif kind == "inception":
    print(f"inception features batch {row['batch']}: {row['ms']:.1f} ms/batch, {row['img_s']:.1f} img/s", flush=True)
  else:
    cached = f", rerun {row['cached_first_images_s']:.1f} s" if "cached_first_images_s" in row else ""
    name = f"{variant} s{row['steps']}" if "steps" in row else variant
    print(
      f"{kind:5} {name:9} batch {row['batch']:3}: first images {row['first_images_s']:6.1f} s (build "
      f"{row['build_s']:.1f}, compile {row['compile_s']:.1f}{cached}), {row['ms']:8.1f} ms/batch, "
      f"{row['img_s']:8.1f} img/s, peak {row['peak_gib']} GiB",
      flush=True,
    )
    if "piece_ms" in row:
      total = row["synchronised_ms"] or 1.0
      parts = ", ".join(f"{k} {v:.0f} ms ({v / total:.0%})" for k, v in row["piece_ms"].items())
      print(f"      synchronised call {row['synchronised_ms']:.0f} ms: {parts}", flush=True)


def print_table(rows: list[dict]) -> None:
  """The MAR / Hi-MAR rows side by side (the HMAR / VAR / inception rows are printed as they finish)."""
  mar_rows = [r for r in rows if r["kind"] in MAR_KINDS]
  if not mar_rows:
    return
  print(
    f"\n{'setting':20} {'build s':>7} {'first img s':>11} {'compile s':>9} {'ms/batch':>9} {'img/s':>8} "
    f"{'peak GiB':>8}  where the time goes (synchronised call)"
  )
  for r in mar_rows:
    if "error" in r:
      print(f"{r['setting']:20} error: {r['error'].splitlines()[-1][:90] if r['error'] else '?'}")
      continue
    total = r["synchronised_ms"] or 1.0
    parts = " ".join(f"{k} {v / total:.0%}" for k, v in r["piece_ms"].items())
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    print(
      f"{r['setting']:20} {r['build_s']:7.1f} {r['first_images_s']:11.1f} {r['compile_s']:9.1f} {r['ms']:9.1f} "
      f"{r['img_s']:8.2f} {peak:>8}  {parts}"
    )


def write(a, rows: list[dict]) -> None:
  """The JSON of --out, rewritten after every setting (a run stopped early keeps what it measured)."""
  import flax
  import jax

  with open(a.out, "w") as f:
    json.dump(
      {
        "what": "hmar_jax sampler (bench/sample.py)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "settings": a.settings,
        "repeats": a.repeats,
        "precompile": not a.no_precompile,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # e.g. a lower autotune level trades run for compile time
        "autotune_level": a.autotune_level,  # the Sampler's gpu_autotune_level ('default': its default)
        "rows": rows,
      },
      f,
      indent=1,
    )


if __name__ == "__main__":
  main()
