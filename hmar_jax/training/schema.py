"""The training config schema: every setting's default and its check, in one place.

A training config is `default_config(task)` with some fields changed (the files under configs/ do
exactly that). `validate(config)` runs before anything is built or compiled and raises ValueError
naming the field: an unknown key (with the nearest valid ones), a wrong type, a value out of range,
or settings that disagree with each other or with the devices (a mesh that does not use them all,
a batch the data shards do not divide).

Sections (every task):
  task, seed           which trainer task (TASKS) and the seed of initialisation and training randomness
  mesh                 shape (data, fsdp, tensor) with -1 for 'the rest'; rules: logical-axis rule set
  distributed          jax.distributed start-up (mode auto / explicit / off, coordinator, process ids)
  data                 source (procedural / folder / tfds), its fields, loader threads / workers
  train                global batch size, steps, gradient accumulation, EMA
  optim                AdamW and the learning-rate / weight-decay schedules
  checkpoint           how often, how many, async, on preemption
  log                  how often; TensorBoard
Task sections: model (the transformer or the VQVAE), tokenizer (the frozen VQVAE of the
transformer tasks), init_from, loss, sample (transformers); loss, codebook, disc (tokenizer);
loss, disc (kl_tokenizer: the KL VAE, no codebook); model (MAR), tokenizer (its frozen KL VAE),
init_from, sample (mar).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from hmar_jax.compile_options import AUTOTUNE_LEVELS
from hmar_jax.data.augment import AUGMENTATIONS
from hmar_jax.models.config import model_config
from hmar_jax.models.himar import check_himar_config, himar_config
from hmar_jax.models.mar import check_mar_config, mar_config
from hmar_jax.models.transformer import check_model_config
from hmar_jax.parallel.mesh import mesh_shape_from_config
from hmar_jax.parallel.partitioning import RULE_SETS
from hmar_jax.sampling.schedules import ScheduleError, check_sampling_options, validate_mask_schedule
from hmar_jax.tokenizer.config import vqvae_config
from hmar_jax.tokenizer.kl_vae import ARCH_FIELDS as KL_ARCH_FIELDS
from hmar_jax.tokenizer.kl_vae import kl_vae_config
from hmar_jax.tokenizer.kl_vae import validate_config as validate_kl_vae
from hmar_jax.tokenizer.vqvae import ARCH_FIELDS
from hmar_jax.tokenizer.vqvae import validate_config as validate_vqvae

TASKS = ("tokenizer", "nsp", "mask_finetune", "kl_tokenizer", "mar", "himar")
MAR_CFG_SCHEDULES = ("linear", "constant")

# Official no-weight-decay names (VAR / HMAR train.py filter_params nowd_keys).
NO_DECAY_KEYS = (
  "cls_token",
  "start_token",
  "task_token",
  "cfg_uncond",
  "pos_embed",
  "pos_1LC",
  "pos_start",
  "start_pos",
  "lvl_embed",
  "gamma",
  "beta",
  "ada_gss",
  "moe_bias",
  "scale_mul",
)
LR_SCHEDULES = ("constant", "lin0", "lin", "lin00", "cos")
DATA_SOURCES = ("procedural", "folder", "tfds")
LOSS_WEIGHTINGS = ("uniform", "equal", "lognorm")


def _common() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = ""
  c.seed = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1: the rest of the devices
  c.mesh.rules = "fsdp_tp"  # hmar_jax.parallel.partitioning.RULE_SETS

  c.distributed = ml_collections.ConfigDict()
  c.distributed.mode = "auto"  # auto: join a detected cluster (TPU pod, Slurm, MPI); explicit; off
  c.distributed.coordinator_address = ""  # 'host:port' of process 0 (explicit start)
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.distributed.local_device_ids = ()  # this process's GPUs; () = all visible
  c.distributed.initialization_timeout = 300

  c.data = ml_collections.ConfigDict()
  c.data.source = "procedural"  # procedural (built in) | folder (path: root/<class>/<image>) | tfds
  c.data.path = ""  # folder
  c.data.name = ""  # tfds dataset name, e.g. imagenet2012
  c.data.split = "train"  # tfds split
  c.data.data_dir = ""  # tfds data_dir ('' = TFDS default)
  c.data.num_examples = 10_000  # procedural: examples; folder / tfds: 0 = all
  c.data.num_classes = 10  # procedural
  c.data.seed = 0  # procedural rendering seed (a held-out set uses seed + 1)
  c.data.shuffle_seed = 0  # order of examples (re-drawn each epoch)
  c.data.num_threads = 4  # grain reader threads per process
  c.data.worker_count = 0  # > 0: grain worker processes
  c.data.prefetch = 8  # batches read ahead
  # Training transform of folder / tfds images (the procedural ones are already S x S): random_crop
  # (official train_aug: shorter edge to 1.125 S, Lanczos, random S x S crop, drawn per position of
  # the example stream) | center_crop (the evaluation transform). Transformer tasks tokenise the
  # center crop once (token cache).
  c.data.augment = "random_crop"

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # global, over all devices and processes
  c.train.num_steps = 1000
  c.train.grad_accum_steps = 1  # micro-batches per step (the batch is split, gradients summed)
  c.train.ema_decay = 0.0  # > 0: keep an EMA of the trained parameters (saved as the final ones)
  # XLA's GEMM / convolution autotuning level for the step on CUDA GPUs (hmar_jax/compile_options.py:
  # 0 off ... 4 with result checks); -1: XLA's default (4, or what XLA_FLAGS sets).
  c.train.gpu_autotune_level = -1

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4  # peak learning rate (x batch / 256 when scale_lr_by_batch)
  c.optim.scale_lr_by_batch = True  # official rule: peak = lr * global batch / 256
  c.optim.schedule = "lin0"  # constant | lin0 | lin | lin00 | cos (official lr_wd_annealing)
  c.optim.warmup_steps = -1  # < 0: warmup_frac of num_steps (official wp = ep / 50)
  c.optim.warmup_frac = 0.02
  c.optim.wp0 = 0.005  # warmup starts at wp0 x peak
  c.optim.wpe = 0.01  # ends at wpe x peak
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.05
  c.optim.weight_decay_end = -1.0  # < 0: constant weight decay; else half cosine to this value
  c.optim.grad_clip = 2.0  # global-norm clip over the trained parameters; 0: off
  c.optim.no_decay_keys = NO_DECAY_KEYS

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 2
  c.checkpoint.async_save = True  # write in the background while training continues
  c.checkpoint.on_preemption = True  # save when SIGTERM / a preemption notice arrives, then stop

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.tensorboard = True  # WORKDIR/tensorboard event files (no TensorFlow needed)
  return c


def _transformer_sections(c: ml_collections.ConfigDict, kind: str) -> None:
  c.model = model_config(16, kind=kind)
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.checkpoint = ""  # a save_vqvae directory; '' = a random VQVAE (smoke tests)
  c.tokenizer.seed = 0
  c.tokenizer.config = vqvae_config("256")
  c.init_from = ""  # parameters to start from (mask_finetune: the next-scale run's params)
  c.data.tokens_cache = ""  # a directory; '' = WORKDIR/tokens; may name another run's cache
  c.data.tokenize_batch_size = 64  # images per encoder call, split over this process's devices
  c.data.tokens_chunk_size = 4096  # images per cache file (the work an interrupted tokenising run redoes)
  c.loss = ml_collections.ConfigDict()
  c.loss.weighting = "lognorm" if kind == "hmar" else "uniform"  # uniform (VAR) | equal | lognorm (HMAR)
  c.loss.label_smoothing = 0.0
  c.sample = ml_collections.ConfigDict()
  c.sample.grid_at_end = True  # WORKDIR/samples.png, one row per class, after training
  c.sample.per_class = 8
  c.sample.seed = 0
  c.sample.cfg = 1.5
  c.sample.top_k = 0
  c.sample.top_p = 0.0
  c.sample.mask_schedule = "none"  # JSON nested lists, 'none' (next-scale only) or 'default' (official, 256 px)


def _tokenizer_sections(c: ml_collections.ConfigDict) -> None:
  c.model = vqvae_config("256")
  c.data.num_eval_images = 16  # held out; reconstructed for the PNG and eval MSE
  c.loss = ml_collections.ConfigDict()
  c.loss.l1_weight = 1.0  # taming: |x - x_rec|
  c.loss.l2_weight = 0.0
  c.loss.vq_weight = 1.0  # the VQVAE's vq_loss (beta inside)
  c.loss.perceptual_weight = 0.0  # taming: 1.0 with LPIPS weights
  c.loss.perceptual_weights = ()  # files: VGG16 (torchvision) + LPIPS heads, .pth or .npz
  c.codebook = ml_collections.ConfigDict()
  c.codebook.rule = "gradient"  # gradient (official VAR) | ema
  c.codebook.ema_decay = 0.99
  c.codebook.ema_eps = 1e-5
  c.codebook.dead_code_steps = 0  # > 0: restart codes unused for this many steps
  c.disc = ml_collections.ConfigDict()
  c.disc.enabled = False
  c.disc.start_step = 0  # the GAN terms are multiplied by 0 before this step
  c.disc.factor = 1.0
  c.disc.weight = 0.8  # taming VQGAN configs: disc_weight 0.8
  c.disc.adaptive_weight = True  # VQGAN's ||grad nll|| / ||grad g|| at the decoder's last layer
  c.disc.base_channels = 64
  c.disc.num_layers = 3
  c.disc.norm = "batch"
  c.disc.lr = 1e-4
  c.disc.b1 = 0.5  # taming: Adam betas (0.5, 0.9)
  c.disc.b2 = 0.9
  c.disc.weight_decay = 0.0
  # VQGAN-style optimiser (taming): Adam (0.5, 0.9), no decay, constant lr.
  c.optim.lr = 1e-4
  c.optim.scale_lr_by_batch = False
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.wp0 = 0.0
  c.optim.b1 = 0.5
  c.optim.b2 = 0.9
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 0.0
  c.optim.no_decay_keys = ("quantizer/embedding",)  # never decay the codebook
  c.train.batch_size = 16


def _kl_tokenizer_sections(c: ml_collections.ConfigDict) -> None:
  """The VQ tokenizer's sections with the KL VAE as model: no codebook, a KL term instead of vq_loss."""
  _tokenizer_sections(c)
  c.model = kl_vae_config("kl16")
  del c.codebook
  del c.loss.vq_weight
  # LDM's kl_weight: it weighs the per-image KL sum against LDM's per-image pixel *sum* of the
  # reconstruction terms; the reconstruction terms here are pixel means, so the task divides the
  # KL by H * W * C and this weight means what it means in LDM's configs.
  c.loss.kl_weight = 1e-6
  c.optim.no_decay_keys = ()
  # True: the saved tokenizer's latent_scale is 1 / (std of the held-out images' posterior means), so
  # MAR's tokens have unit spread (what MAR's 0.2325 does for kl16); False keeps config.model's.
  c.normalize_latents = False


def _mar_sections(c: ml_collections.ConfigDict) -> None:
  """MAR over a frozen KL VAE, with the official recipe (LTH14/mar main_mar.py and its README)."""
  c.model = mar_config("base")
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.checkpoint = ""  # a save_kl_vae / converted kl16 directory; '' = a random KL VAE (smoke tests)
  c.tokenizer.seed = 0
  c.tokenizer.config = kl_vae_config("kl16")
  c.init_from = ""  # MAR parameters to start from (a save_mar directory: a converted or trained MAR)
  # Official transform: center crop (center_crop_arr) then a random horizontal flip; the flip is drawn
  # in the step from the step's key (so it is the same on resume and on any device count).
  c.data.augment = "center_crop"
  c.data.flip = True
  # The KL VAE's posterior moments of each centre crop and its flip, encoded once (official main_cache.py
  # + --use_cached; hmar_jax/training/latent_cache.py): '' = encode every step; 'auto' = WORKDIR/latents;
  # or a directory (built there if missing, resumably; may name another run's cache).
  c.data.latents_cache = ""
  # AdamW (0.9, 0.95), lr = blr 1e-4 x global batch / 256, warm-up from 0 then constant, weight decay
  # 0.02 on every weight matrix (add_weight_decay: 1-D tensors and biases excluded, no name list),
  # gradient clip 3.0, EMA 0.9999.
  c.optim.lr = 1e-4
  c.optim.scale_lr_by_batch = True
  c.optim.schedule = "constant"
  c.optim.warmup_frac = 0.25  # official: 100 of 400 epochs
  c.optim.wp0 = 0.0
  c.optim.weight_decay = 0.02
  c.optim.grad_clip = 3.0
  c.optim.no_decay_keys = ()
  c.train.ema_decay = 0.9999
  c.train.batch_size = 64
  c.sample = ml_collections.ConfigDict()
  c.sample.grid_at_end = True  # WORKDIR/samples.png, one row per class, after training
  c.sample.per_class = 8
  c.sample.seed = 0
  c.sample.num_iter = 64  # official evaluation: 256 (FID), 64 for speed
  c.sample.cfg = 1.0
  c.sample.cfg_schedule = "linear"
  c.sample.temperature = 1.0


def _himar_sections(c: ml_collections.ConfigDict) -> None:
  """Hi-MAR over a frozen KL VAE: MAR's sections and recipe (main_himar.py keeps MAR's arguments),
  a Hi-MAR model, and both stages' sampling settings (official README, Hi-MAR-B)."""
  _mar_sections(c)
  c.model = himar_config("base")
  c.sample.num_iter = 4  # stage-2 steps (stage 1 takes cond_scale * 4)
  c.sample.cfg = 2.5  # stage 2 (the DiT head)
  c.sample.re_cfg = 2.7  # stage 1 (the MLP head)


def default_config(task: str) -> ml_collections.ConfigDict:
  """Every field of a `task` training config with its default."""
  if task not in TASKS:
    raise ValueError(f"config.task must be one of {TASKS}, got {task!r}")
  c = _common()
  c.task = task
  if task == "tokenizer":
    _tokenizer_sections(c)
  elif task == "kl_tokenizer":
    _kl_tokenizer_sections(c)
  elif task == "mar":
    _mar_sections(c)
  elif task == "himar":
    _himar_sections(c)
  else:
    _transformer_sections(c, "hmar")
  if task == "mask_finetune":
    c.loss.weighting = "mask_unweighted"  # official: mean CE over the masked tokens
    c.loss.same_mask_positions_for_batch = True  # official: one set of masked positions per batch
  return c


# ----------------------------------------------------------------------------- checks


class ConfigError(ValueError):
  """A training config that cannot run; the message names the field."""


def _keys(c) -> list[str]:
  return list(c.keys()) if isinstance(c, (ml_collections.ConfigDict, Mapping)) else []


def _unknown_keys(config, defaults, prefix: str, free: tuple[str, ...]) -> None:
  for key in _keys(config):
    path = f"{prefix}{key}"
    if key not in _keys(defaults):
      near = difflib.get_close_matches(key, _keys(defaults), n=3, cutoff=0.5)
      hint = (
        f"; did you mean {', '.join(prefix + n for n in near)}?"
        if near
        else f"; valid keys here: {', '.join(sorted(_keys(defaults)))}"
      )
      raise ConfigError(f"unknown config key {path}{hint}")
    value, default = config[key], defaults[key]
    if isinstance(default, (ml_collections.ConfigDict, Mapping)):
      if path in free:
        continue
      if not isinstance(value, (ml_collections.ConfigDict, Mapping)):
        raise ConfigError(f"{path} must be a section (ConfigDict), got {type(value).__name__}")
      _unknown_keys(value, default, path + ".", free)
    else:
      _check_type(path, value, default)


def _check_type(path: str, value, default) -> None:
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif isinstance(default, str):
    ok = isinstance(value, str) or (path.endswith("mask_schedule") and isinstance(value, (list, tuple)))
  elif isinstance(default, (tuple, list)):
    ok = isinstance(value, (tuple, list))
  else:
    ok = True
  if not ok:
    raise ConfigError(
      f"{path} must be {type(default).__name__} (like its default {default!r}), got {type(value).__name__} {value!r}"
    )


def _positive_int(path: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"{path} must be a positive int, got {value!r}")


def _in_range(path: str, value, lo, hi, *, lo_open=False, hi_open=True) -> None:
  bad = value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi)
  if bad:
    lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
    raise ConfigError(f"{path} must be in {lb}{lo}, {hi}{rb}, got {value!r}")


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
  """Raises ConfigError naming the first problem; returns None for a config that can run.

  num_devices: when given, the mesh shape must use exactly that many devices.
  """
  task = config.get("task") if isinstance(config, ml_collections.ConfigDict) else None
  if task not in TASKS:
    raise ConfigError(f"config.task must be one of {TASKS}, got {task!r}")
  defaults = default_config(task)
  # Architecture sections are checked by their own validators (which know derived fields).
  _unknown_keys(config, defaults, "config.", free=("config.model", "config.tokenizer.config"))
  _check_common(config, num_devices)
  if task == "tokenizer":
    _check_tokenizer(config)
  elif task == "kl_tokenizer":
    _check_kl_tokenizer(config)
  elif task in ("mar", "himar"):
    _check_mar(config)
  else:
    _check_transformer(config)


def _check_common(c, num_devices) -> None:
  if not isinstance(c.seed, int) or c.seed < 0:
    raise ConfigError(f"config.seed must be an int >= 0, got {c.seed!r}")
  try:
    mesh_shape_from_config(tuple(c.mesh.shape), num_devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh.shape: {e}") from None
  if c.mesh.rules not in RULE_SETS:
    raise ConfigError(f"config.mesh.rules must be one of {sorted(RULE_SETS)}, got {c.mesh.rules!r}")
  if c.distributed.mode not in ("auto", "explicit", "off"):
    raise ConfigError(f"config.distributed.mode must be auto, explicit or off, got {c.distributed.mode!r}")
  if c.distributed.mode == "explicit" and not c.distributed.coordinator_address:
    raise ConfigError("config.distributed.mode 'explicit' needs config.distributed.coordinator_address (host:port)")
  if c.distributed.num_processes < 1 or not 0 <= c.distributed.process_id < c.distributed.num_processes:
    raise ConfigError(
      f"config.distributed: need num_processes >= 1 and 0 <= process_id < num_processes, got "
      f"{c.distributed.num_processes}, {c.distributed.process_id}"
    )
  d = c.data
  if d.source not in DATA_SOURCES:
    raise ConfigError(f"config.data.source must be one of {DATA_SOURCES}, got {d.source!r}")
  if d.source == "folder":
    if not os.path.isdir(d.path or ""):
      raise ConfigError(f"config.data.path {d.path!r} is not a directory (needed for source 'folder')")
    if not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(d.path)):
      raise ConfigError(
        f"config.data.path {d.path!r} has no class subfolders; expected PATH/<class name>/<image files>"
      )
  if d.source == "tfds" and not d.name:
    raise ConfigError("config.data.name must name the TFDS dataset (e.g. imagenet2012) for source 'tfds'")
  if d.source == "procedural":
    _positive_int("config.data.num_examples", d.num_examples)
    _positive_int("config.data.num_classes", d.num_classes)
  elif d.num_examples < 0:
    raise ConfigError(f"config.data.num_examples must be >= 0 (0 = all), got {d.num_examples}")
  for name in ("num_threads", "worker_count"):
    if d[name] < 0:
      raise ConfigError(f"config.data.{name} must be >= 0, got {d[name]}")
  _positive_int("config.data.prefetch", d.prefetch)
  if d.augment not in AUGMENTATIONS:
    raise ConfigError(f"config.data.augment must be one of {AUGMENTATIONS}, got {d.augment!r}")
  t = c.train
  for name in ("batch_size", "num_steps", "grad_accum_steps"):
    _positive_int(f"config.train.{name}", t[name])
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(
      f"config.train.batch_size {t.batch_size} is not divisible by config.train.grad_accum_steps {t.grad_accum_steps}"
    )
  _in_range("config.train.ema_decay", t.ema_decay, 0.0, 1.0)
  if isinstance(t.gpu_autotune_level, bool) or t.gpu_autotune_level not in (-1, *AUTOTUNE_LEVELS):
    raise ConfigError(f"config.train.gpu_autotune_level must be -1 (XLA's default) or 0..4, got {t.gpu_autotune_level}")
  o = c.optim
  if not o.lr > 0:
    raise ConfigError(f"config.optim.lr must be > 0, got {o.lr}")
  if o.schedule not in LR_SCHEDULES:
    raise ConfigError(f"config.optim.schedule must be one of {LR_SCHEDULES}, got {o.schedule!r}")
  if o.warmup_steps >= t.num_steps and o.warmup_steps > 0:
    raise ConfigError(f"config.optim.warmup_steps {o.warmup_steps} must be < config.train.num_steps {t.num_steps}")
  _in_range("config.optim.warmup_frac", o.warmup_frac, 0.0, 1.0)
  for name in ("wp0", "wpe"):
    _in_range(f"config.optim.{name}", o[name], 0.0, 1.0, hi_open=False)
  for name in ("b1", "b2"):
    _in_range(f"config.optim.{name}", o[name], 0.0, 1.0)
  if o.eps <= 0 or o.weight_decay < 0 or o.grad_clip < 0:
    raise ConfigError(
      f"config.optim: need eps > 0, weight_decay >= 0, grad_clip >= 0; got eps={o.eps}, "
      f"weight_decay={o.weight_decay}, grad_clip={o.grad_clip}"
    )
  _positive_int("config.checkpoint.every_steps", c.checkpoint.every_steps)
  _positive_int("config.checkpoint.max_to_keep", c.checkpoint.max_to_keep)
  _positive_int("config.log.every_steps", c.log.every_steps)


def _check_transformer(c) -> None:
  _unknown_keys(c.model, model_config(16), "config.model.", free=())
  try:
    check_model_config(c.model)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from None
  try:
    tok = validate_vqvae(c.tokenizer.config)
  except ValueError as e:
    raise ConfigError(f"config.tokenizer.config: {e}") from None
  m = c.model
  problems = []
  if tuple(tok["patch_nums"]) != tuple(m.patch_nums):
    problems.append(f"patch_nums {tuple(tok['patch_nums'])} vs model {tuple(m.patch_nums)}")
  if tok["vocab_size"] != m.vocab_size:
    problems.append(f"vocab_size {tok['vocab_size']} vs model {m.vocab_size}")
  if tok["z_channels"] != m.cvae:
    problems.append(f"Cvae {tok['z_channels']} vs model cvae {m.cvae}")
  if problems:
    raise ConfigError("config.tokenizer.config and config.model disagree: " + "; ".join(problems))
  if c.data.source == "procedural" and c.data.num_classes > m.num_classes:
    raise ConfigError(f"config.data.num_classes {c.data.num_classes} exceeds config.model.num_classes {m.num_classes}")
  if c.task == "mask_finetune":
    if not m.mask_layers or m.pattern != "block_diagonal":
      raise ConfigError(
        "masked finetuning needs an HMAR model (config.model.pattern 'block_diagonal', "
        f"mask_layers > 0), got pattern={m.pattern!r}, mask_layers={m.mask_layers}"
      )
    if not c.init_from:
      raise ConfigError("config.init_from must name the next-scale model's parameters (its WORKDIR/params)")
    if c.loss.weighting != "mask_unweighted":
      raise ConfigError(
        f"config.loss.weighting must be 'mask_unweighted' for masked finetuning, got {c.loss.weighting!r}"
      )
  elif c.loss.weighting not in LOSS_WEIGHTINGS:
    raise ConfigError(f"config.loss.weighting must be one of {LOSS_WEIGHTINGS}, got {c.loss.weighting!r}")
  if c.init_from and not os.path.isdir(c.init_from):
    raise ConfigError(f"config.init_from {c.init_from!r} is not a directory")
  if c.tokenizer.checkpoint and not os.path.isdir(c.tokenizer.checkpoint):
    raise ConfigError(f"config.tokenizer.checkpoint {c.tokenizer.checkpoint!r} is not a directory")
  _in_range("config.loss.label_smoothing", c.loss.label_smoothing, 0.0, 1.0)
  _positive_int("config.data.tokenize_batch_size", c.data.tokenize_batch_size)
  _positive_int("config.data.tokens_chunk_size", c.data.tokens_chunk_size)
  cache = c.data.tokens_cache
  if cache and os.path.exists(cache) and not os.path.isdir(cache):
    raise ConfigError(
      f"config.data.tokens_cache {cache!r} is a file; the token cache is a directory (of chunk files and a "
      "manifest): name a directory, or leave it empty for WORKDIR/tokens"
    )
  s = c.sample
  _positive_int("config.sample.per_class", s.per_class)
  try:
    check_sampling_options(cfg=s.cfg, top_k=s.top_k, top_p=s.top_p, prefix="config.sample.")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check_mask_schedule(c)


def _check_mask_schedule(c) -> None:
  """config.sample.mask_schedule, used for the sample grid after training: checked now, not then."""
  s = c.sample
  try:
    schedule = validate_mask_schedule(s.mask_schedule, c.model.patch_nums)
  except ScheduleError as e:
    raise ConfigError(f"config.sample.mask_schedule: {e}") from None
  if c.task == "nsp" and any(len(e) > 1 for e in schedule):
    raise ConfigError(
      f"config.sample.mask_schedule {s.mask_schedule!r} refines some scales in several steps, but next-scale "
      "training has no masked-prediction branch: use 'none' (masked refinement follows task mask_finetune)"
    )


def _check_tokenizer(c) -> None:
  for key in _keys(c.model):
    if key not in ARCH_FIELDS:
      near = difflib.get_close_matches(key, ARCH_FIELDS, n=3, cutoff=0.5)
      raise ConfigError(f"unknown config key config.model.{key}" + (f"; did you mean {near}?" if near else ""))
  try:
    arch = validate_vqvae(c.model)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from None
  _positive_int("config.data.num_eval_images", c.data.num_eval_images)
  _check_image_losses(c, arch["image_size"], ("vq_weight",))
  cb = c.codebook
  if cb.rule not in ("gradient", "ema"):
    raise ConfigError(f"config.codebook.rule must be 'gradient' or 'ema', got {cb.rule!r}")
  _in_range("config.codebook.ema_decay", cb.ema_decay, 0.0, 1.0)
  if cb.dead_code_steps < 0:
    raise ConfigError(f"config.codebook.dead_code_steps must be >= 0 (0: off), got {cb.dead_code_steps}")


def _check_kl_tokenizer(c) -> None:
  for key in _keys(c.model):
    if key not in KL_ARCH_FIELDS:
      near = difflib.get_close_matches(key, KL_ARCH_FIELDS, n=3, cutoff=0.5)
      raise ConfigError(f"unknown config key config.model.{key}" + (f"; did you mean {near}?" if near else ""))
  try:
    arch = validate_kl_vae(c.model)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from None
  _positive_int("config.data.num_eval_images", c.data.num_eval_images)
  _check_image_losses(c, arch["image_size"], ("kl_weight",))
  if not isinstance(c.normalize_latents, bool):
    raise ConfigError(f"config.normalize_latents must be True or False, got {c.normalize_latents!r}")


def _check_mar(c) -> None:
  """Task mar or himar: the model, its KL VAE and the sampling settings."""
  himar = c.task == "himar"
  _unknown_keys(c.model, himar_config("base") if himar else mar_config("base"), "config.model.", free=())
  try:
    (check_himar_config if himar else check_mar_config)(c.model)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from None
  for key in _keys(c.tokenizer.config):
    if key not in KL_ARCH_FIELDS:
      near = difflib.get_close_matches(key, KL_ARCH_FIELDS, n=3, cutoff=0.5)
      raise ConfigError(
        f"unknown config key config.tokenizer.config.{key}" + (f"; did you mean {near}?" if near else "")
      )
  try:
    vae = validate_kl_vae(c.tokenizer.config)
  except ValueError as e:
    raise ConfigError(f"config.tokenizer.config: {e}") from None
  m = c.model
  stride = 2 ** (len(vae["ch_mult"]) - 1)
  problems = []
  if vae["embed_dim"] != m.vae_embed_dim:
    problems.append(f"embed_dim {vae['embed_dim']} vs model vae_embed_dim {m.vae_embed_dim}")
  if stride != m.vae_stride:
    problems.append(f"downsampling {stride} vs model vae_stride {m.vae_stride}")
  if vae["image_size"] != m.img_size:
    problems.append(f"image_size {vae['image_size']} vs model img_size {m.img_size}")
  if problems:
    raise ConfigError("config.tokenizer.config and config.model disagree: " + "; ".join(problems))
  if c.data.source == "procedural" and c.data.num_classes > m.class_num:
    raise ConfigError(f"config.data.num_classes {c.data.num_classes} exceeds config.model.class_num {m.class_num}")
  if c.init_from and not os.path.isdir(c.init_from):
    raise ConfigError(f"config.init_from {c.init_from!r} is not a directory")
  if c.tokenizer.checkpoint and not os.path.isdir(c.tokenizer.checkpoint):
    raise ConfigError(f"config.tokenizer.checkpoint {c.tokenizer.checkpoint!r} is not a directory")
  if not isinstance(c.data.flip, bool):
    raise ConfigError(f"config.data.flip must be True or False, got {c.data.flip!r}")
  _check_latents_cache(c)
  s = c.sample
  _positive_int("config.sample.per_class", s.per_class)
  _positive_int("config.sample.num_iter", s.num_iter)
  if s.cfg < 1.0:
    raise ConfigError(f"config.sample.cfg must be >= 1 (1 = no guidance), got {s.cfg}")
  if s.cfg_schedule not in MAR_CFG_SCHEDULES:
    raise ConfigError(f"config.sample.cfg_schedule must be one of {MAR_CFG_SCHEDULES}, got {s.cfg_schedule!r}")
  if not s.temperature > 0:
    raise ConfigError(f"config.sample.temperature must be > 0, got {s.temperature}")
  if himar and s.re_cfg < 1.0:
    raise ConfigError(f"config.sample.re_cfg must be >= 1 (1 = no guidance in stage 1), got {s.re_cfg}")


def _check_latents_cache(c) -> None:
  cache = c.data.latents_cache
  if not cache:
    return
  if cache != "auto" and os.path.exists(cache) and not os.path.isdir(cache):
    raise ConfigError(
      f"config.data.latents_cache {cache!r} is a file; the latent cache is a directory (of chunk files and a "
      "manifest): name a directory, 'auto' (WORKDIR/latents) or '' (encode every step)"
    )
  if c.data.augment != "center_crop":
    raise ConfigError(
      f"config.data.latents_cache holds the moments of each image's centre crop (official main_cache.py), but "
      f"config.data.augment is {c.data.augment!r}: set it to 'center_crop', or latents_cache to '' to encode "
      "every step"
    )


def _check_image_losses(c, image_size: int, other_weights: tuple[str, ...]) -> None:
  """The reconstruction, perceptual and GAN settings shared by the VQ and KL tokenizer tasks."""
  lw = c.loss
  for name in ("l1_weight", "l2_weight", *other_weights, "perceptual_weight"):
    if lw[name] < 0:
      raise ConfigError(f"config.loss.{name} must be >= 0, got {lw[name]}")
  if lw.l1_weight == 0 and lw.l2_weight == 0:
    raise ConfigError("config.loss.l1_weight and l2_weight are both 0: no reconstruction loss")
  if lw.perceptual_weight > 0:
    if not list(lw.perceptual_weights):
      raise ConfigError(
        "config.loss.perceptual_weight > 0 needs config.loss.perceptual_weights: the LPIPS "
        "weight file(s) (VGG16 + LPIPS heads, .npz or .pth; nothing is downloaded)"
      )
    if image_size < 16:
      raise ConfigError(f"the perceptual loss needs images of at least 16 px, got {image_size}")
  g = c.disc
  if g.enabled:
    if g.norm not in ("batch", "group", "none"):
      raise ConfigError(f"config.disc.norm must be 'batch', 'group' or 'none', got {g.norm!r}")
    if g.start_step < 0 or g.weight < 0:
      raise ConfigError(f"config.disc.start_step and weight must be >= 0, got {g.start_step}, {g.weight}")
    down = 2**g.num_layers
    if image_size < 2 * down:
      raise ConfigError(
        f"a {g.num_layers}-layer discriminator needs images of at least {2 * down} px, got {image_size}"
      )
    if c.train.grad_accum_steps > 1:
      raise ConfigError(
        "config.train.grad_accum_steps > 1 is not supported with the discriminator on "
        "(its BatchNorm statistics and update need the whole batch)"
      )


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys ('train.num_steps': 5) on a copy of `config`; an unknown key raises ConfigError."""
  config = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    node = config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
      if part not in _keys(node):
        near = difflib.get_close_matches(part, _keys(node), n=3, cutoff=0.5)
        where = ".".join(parts[: i + 1])
        raise ConfigError(f"unknown config key config.{where}" + (f"; did you mean {near}?" if near else ""))
      if i == len(parts) - 1:
        node[part] = value
      else:
        node = node[part]
  return config
