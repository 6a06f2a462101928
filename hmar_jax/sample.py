"""Sample class-conditional images from a trained HMAR / VAR and write a PNG grid.

  python -m hmar_jax.sample --params=runs/hmar_mask/params --tokenizer=runs/tokenizer/params \
      --classes=0,1,2,3 --per_class=8 --cfg=1.5 --top_k=0 --top_p=0 \
      --mask_schedule='[[1],[1,3],[1,2,6],[25],[64]]' --seed=0 --out=samples.png

--params is a directory written by training (workdir/params: weights plus the model config
in its metadata); --tokenizer a VQVAE checkpoint (save_vqvae). --mask_schedule 'none'
samples with next-scale prediction only; 'default' is the official 256 px schedule.
Each row of the grid is one class.

  python -m hmar_jax.sample --params=... --tokenizer=... --per_class=50 --out_dir=samples_50k \
      --batch_size=256 --cfg=1.5 --top_k=900 --top_p=0.96 --mask_schedule=default

With --out_dir every class (or --classes) is sampled --per_class times over all devices and hosts,
batch by batch, resumably, into OUT/samples_<N>x<H>x<W>x3.npz (the evaluator's `arr_0` layout) and
OUT/grid.png (hmar_jax/sampling/at_scale.py).

A MAR checkpoint (save_mar: a converted official MAR or a trained one) with its KL VAE (save_kl_vae)
is sampled with MAR's own options (official evaluation of MAR-L: --num_iter=256 --cfg=3.0
--cfg_schedule=linear --temperature=1.0; MAR-B cfg 2.9, MAR-H 3.2; without guidance --cfg=1.0
--temperature=0.95); the HMAR / VAR options (--top_k, --top_p, --mask_schedule, --mask_cfg,
--kv_cache) are refused for it, and MAR's (--num_iter, --cfg_schedule, --temperature) for HMAR / VAR:

  python -m hmar_jax.sample --params=mar_large/params --tokenizer=kl16 --per_class=50 \
      --out_dir=samples_50k --batch_size=256 --num_iter=256 --cfg=3.0 --cfg_schedule=linear

A Hi-MAR checkpoint (save_himar) with its KL VAE takes MAR's options plus --re_cfg, the guidance of
its first (low-resolution) stage; --cfg guides the second. Official evaluation: Hi-MAR-B --num_iter=4
--cfg=2.5 --re_cfg=2.7; Hi-MAR-L --num_iter=4 --cfg=3.5 --re_cfg=3.5; Hi-MAR-H --num_iter=12 --cfg=3.2
--re_cfg=5.5; all --cfg_schedule=linear --temperature=1.0 (one temperature, both stages). --num_iter
defaults to 4 for Hi-MAR. --re_cfg is refused for the other families, the HMAR / VAR options for Hi-MAR.
"""

from __future__ import annotations

import concurrent.futures
import os
import tempfile
import time

import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from PIL import Image

from hmar_jax import checkpoint, cli
from hmar_jax.abstract import abstract_module
from hmar_jax.device_warmup import start_device_warmup
from hmar_jax.image_grid import save_image_grid
from hmar_jax.models.config import upgrade_model_config
from hmar_jax.models.layout import to_layout, to_layout_shapes
from hmar_jax.models.mar_model import PARAMS_KIND as MAR_PARAMS_KIND
from hmar_jax.models.mar_model import load_mar
from hmar_jax.models.transformer import ScaleTransformer
from hmar_jax.sampling import Sampler, check_sampling_options, validate_mask_schedule
from hmar_jax.sampling.at_scale import class_labels, sample_to_dir
from hmar_jax.sampling.himar_generate import DEFAULT_CFG as HIMAR_CFG
from hmar_jax.sampling.himar_generate import DEFAULT_NUM_ITER as HIMAR_NUM_ITER
from hmar_jax.sampling.himar_generate import DEFAULT_RE_CFG as HIMAR_RE_CFG
from hmar_jax.sampling.himar_generate import HiMARSampler, check_himar_sampling_options
from hmar_jax.sampling.mar_generate import (
  DEFAULT_CFG_SCHEDULE,
  DEFAULT_NUM_ITER,
  DEFAULT_TEMPERATURE,
  MARSampler,
  check_mar_sampling_options,
)
from hmar_jax.sampling.program_cache import default_program_cache_dir
from hmar_jax.sampling.sampler import DEFAULT_GPU_TRITON_GEMM
from hmar_jax.sampling.schedules import parse_mask_schedule
from hmar_jax.tokenizer.kl_vae import load_kl_vae
from hmar_jax.tokenizer.vqvae import abstract_vqvae_of_checkpoint, load_vqvae

FLAGS = flags.FLAGS

HMAR_CFG = 1.5  # --cfg when not given, for HMAR / VAR
MAR_CFG = 1.0  # --cfg when not given, for MAR (main_mar.py's default: no guidance)
HMAR_ONLY_FLAGS = ("top_k", "top_p", "mask_schedule", "mask_cfg", "kv_cache")
MAR_ONLY_FLAGS = ("num_iter", "cfg_schedule", "temperature")  # MAR and Hi-MAR
HIMAR_ONLY_FLAGS = ("re_cfg",)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines this command line's flags (in `flag_values`). Called only when the module runs as a
  program (or by a test, with its own FlagValues): training imports it (write_sample_grid), and its
  flags must not join the training command line."""
  kw = dict(flag_values=flag_values)
  flags.DEFINE_string("params", None, "Trained transformer (workdir/params) or MAR (save_mar) checkpoint.", **kw)
  flags.DEFINE_string("tokenizer", None, "VQVAE checkpoint directory (a KL VAE one for MAR).", **kw)
  flags.DEFINE_string("classes", "", "Comma-separated class ids (default: all classes, up to 10).", **kw)
  flags.DEFINE_integer("per_class", 8, "Samples per class (one grid row per class).", **kw)
  flags.DEFINE_float(
    "cfg",
    None,
    f"Classifier-free guidance. HMAR / VAR: at the last scale (linear ramp from 0), default {HMAR_CFG}. "
    f"MAR / Hi-MAR: >= 1 (1 = none), ramped by --cfg_schedule, default {MAR_CFG} / {HIMAR_CFG}.",
    **kw,
  )
  flags.DEFINE_integer("top_k", 900, "HMAR / VAR: top-k filtering, >= 0 (0 = off).", **kw)
  flags.DEFINE_float("top_p", 0.96, "HMAR / VAR: top-p filtering, in [0, 1] (0 = off).", **kw)
  flags.DEFINE_string(
    "mask_schedule", "none", "HMAR: per-scale mask schedule as JSON nested lists, 'none' or 'default'.", **kw
  )
  flags.DEFINE_float("mask_cfg", 0.0, "HMAR: guidance of the masked refinement steps (official ~0).", **kw)
  flags.DEFINE_bool("kv_cache", False, "Force VAR-style KV-cache sampling (automatic for VAR models).", **kw)
  flags.DEFINE_integer(
    "num_iter",
    DEFAULT_NUM_ITER,
    f"MAR: generation steps (official evaluation 256). Hi-MAR: stage-2 steps (default {HIMAR_NUM_ITER}).",
    **kw,
  )
  flags.DEFINE_string("cfg_schedule", DEFAULT_CFG_SCHEDULE, "MAR: guidance per step, 'linear' or 'constant'.", **kw)
  flags.DEFINE_float("temperature", DEFAULT_TEMPERATURE, "MAR / Hi-MAR: diffusion sampling temperature, > 0.", **kw)
  flags.DEFINE_float(
    "re_cfg", HIMAR_RE_CFG, "Hi-MAR: guidance of the low-resolution stage, >= 1 (1 = none; --cfg guides stage 2).", **kw
  )
  flags.DEFINE_integer("seed", 0, "PRNG seed (same seed, same images).", **kw)
  flags.DEFINE_string("out", "samples.png", "Output image path (.png; its folder is made if missing).", **kw)
  flags.DEFINE_string(
    "out_dir", "", "Sample at scale into this folder instead (every device and host, resumable, ADM .npz).", **kw
  )
  flags.DEFINE_integer("batch_size", 64, "--out_dir: images per global batch (a multiple of the local devices).", **kw)
  flags.DEFINE_bool("pngs", False, "--out_dir: also write one PNG per image.", **kw)


def check_output_path(out: str) -> None:
  """Raises ValueError unless an image can be written at `out`: a file name with an extension PIL
  writes, not an existing folder, in a folder that exists and is writable or can be made (its
  nearest existing ancestor is a writable folder). Run before any loading or sampling."""
  path = os.path.abspath(os.fspath(out))
  if os.path.isdir(path):
    raise ValueError(f"output path {out!r} is a folder; give a file name such as {os.path.join(out, 'samples.png')!r}")
  Image.init()
  ext = os.path.splitext(path)[1].lower()
  if Image.registered_extensions().get(ext) not in Image.SAVE:
    raise ValueError(f"output path {out!r} needs an image file extension PIL can write, such as .png")
  folder = os.path.dirname(path)
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise ValueError(f"output path {out!r} cannot be written: {folder!r} is a file, not a folder")
  try:  # writing a file answers for every cause (permissions, read-only mounts, root); os.access does not
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as e:
    raise ValueError(
      f"output path {out!r} cannot be written: folder {folder!r} is not writable ({e.strerror})"
    ) from None


def _abstract_model(model_config):
  return abstract_module(lambda rngs: ScaleTransformer(model_config, rngs=rngs))


def _stored_model_config(params_dir: str) -> ml_collections.ConfigDict:
  meta = checkpoint.load_metadata(params_dir)
  if "model" not in meta:
    raise ValueError(f"{params_dir} stores no model config (expected a training run's workdir/params)")
  return upgrade_model_config(ml_collections.ConfigDict(meta["model"]))


def load_transformer(params_dir: str, *, scan_layers: bool | None = True):
  """A ScaleTransformer built from the model config stored with its parameters.

  scan_layers: the block layout of the returned model, whatever the checkpoint's (converted
  official weights are stored as a list of blocks): True (default) stacks the blocks for one
  jax.lax.scan, so each sampling step compiles one block, not one per block; None keeps the
  checkpoint's layout.
  """
  model_config = _stored_model_config(params_dir)
  stored_scan = bool(model_config.scan_layers)
  if scan_layers is not None:
    model_config.scan_layers = bool(scan_layers)
  # Built as shapes, then filled from the checkpoint: no random init and no zeros written first
  # (two zero-filled models cost a second of a d16 load, under Python's lock).
  model = _abstract_model(model_config)
  if stored_scan == bool(model_config.scan_layers):
    return checkpoint.restore_params(params_dir, model)
  # Another layout: read (and checked) into host memory, restacked there, put on the device once.
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  host = checkpoint.read_params(params_dir, to_layout_shapes(params, stored_scan))
  return checkpoint.place_params(model, to_layout(host, bool(model_config.scan_layers)))


def abstract_transformer(params_dir: str, *, scan_layers: bool | None = True):
  """The model `load_transformer(params_dir, scan_layers=...)` returns, as shapes only (no weights
  read), after checking the checkpoint's stored keys and shapes against it (CheckpointMismatchError
  naming them; FileNotFoundError for a folder that holds no checkpoint)."""
  model_config = _stored_model_config(params_dir)
  stored_scan = bool(model_config.scan_layers)
  if scan_layers is not None:
    model_config.scan_layers = bool(scan_layers)
  model = _abstract_model(model_config)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # the checkpoint's shapes in its own layout, without building a second model in that layout
  checkpoint.check_params(params_dir, to_layout_shapes(params, stored_scan))
  return model


def sampler_from_checkpoints(params_dir: str, tokenizer_dir: str, **sampler_kwargs) -> Sampler:
  """A Sampler of the transformer and tokenizer checkpoints whose weights are read in a background
  thread (`Sampler.load_weights_in_background`) while `Sampler.precompile` compiles its programs for
  their shapes: the start-up pays for the longer of the two, not both. Both checkpoints' keys and
  shapes are checked first (their metadata only), so a wrong checkpoint fails before anything
  compiles; sampler_kwargs: as Sampler. The devices' one-time start-up (their allocators, the math
  libraries) runs meanwhile in another thread (`hmar_jax.device_warmup`). Unless sampler_kwargs say
  otherwise, the compiled programs are kept in a `program_cache` inside JAX's persistent compilation
  cache (when that is on), so that a rerun neither traces nor compiles them."""
  sampler_kwargs.setdefault("program_cache", default_program_cache_dir())
  start_device_warmup(triton_gemm=sampler_kwargs.get("gpu_triton_gemm", DEFAULT_GPU_TRITON_GEMM))
  sampler = Sampler(abstract_transformer(params_dir), abstract_vqvae_of_checkpoint(tokenizer_dir), **sampler_kwargs)

  def load():  # both checkpoints at once: on 2 CPU cores a d16 pair loaded in 3.1-5.2 s, not 5.3-7.8 s
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="checkpoint-read") as pool:
      model, vqvae = pool.submit(load_transformer, params_dir), pool.submit(load_vqvae, tokenizer_dir)
      return model.result(), vqvae.result()

  sampler.load_weights_in_background(load)
  return sampler


def write_sample_grid(
  model,
  vqvae,
  out: str,
  *,
  classes=None,
  per_class: int = 8,
  cfg: float = 1.5,
  top_k: int = 900,
  top_p: float = 0.96,
  mask_schedule=None,
  mask_cfg: float = 0.0,
  seed: int = 0,
  kv_cache: bool = False,
) -> str:
  """Samples `per_class` images of each class (one grid row per class) and writes a PNG.

  Args as `hmar_jax.sampling.Sampler.sample_indices`; `mask_schedule` may be 'none',
  'default' (the official 256 px schedule), JSON text or nested lists. Returns the path.
  Bad arguments and an unwritable `out` raise ValueError before anything is compiled.
  """
  check_sampling_options(cfg=cfg, top_k=top_k, top_p=top_p, mask_cfg=mask_cfg)
  check_output_path(out)
  validate_mask_schedule(mask_schedule, model.patch_nums)
  sampler = Sampler(model, vqvae, use_kv_cache=True if kv_cache else None)
  return sample_grid_to_png(
    sampler,
    out,
    classes=classes,
    per_class=per_class,
    cfg=cfg,
    top_k=top_k,
    top_p=top_p,
    mask_schedule=mask_schedule,
    mask_cfg=mask_cfg,
    seed=seed,
  )


def sample_grid_to_png(
  sampler: Sampler,
  out: str,
  *,
  classes=None,
  per_class: int = 8,
  cfg: float = 1.5,
  top_k: int = 900,
  top_p: float = 0.96,
  mask_schedule=None,
  mask_cfg: float = 0.0,
  seed: int = 0,
) -> str:
  """`write_sample_grid` with a Sampler made already (e.g. by `sampler_from_checkpoints`, whose
  weights may still be on their way: its programs compile meanwhile). Returns the path."""
  check_sampling_options(cfg=cfg, top_k=top_k, top_p=top_p, mask_cfg=mask_cfg)
  check_output_path(out)
  schedule = validate_mask_schedule(mask_schedule, sampler.patch_nums)  # fail before compiling
  classes = list(range(min(10, sampler.num_classes))) if not classes else [int(c) for c in classes]
  bad = [c for c in classes if not 0 <= c <= sampler.num_classes]
  if bad:
    raise ValueError(f"class ids {bad} outside [0, {sampler.num_classes}] ({sampler.num_classes} = unconditional)")
  labels = np.repeat(np.asarray(classes, np.int32), per_class)
  kw = dict(cfg=cfg, top_k=top_k, top_p=top_p, mask_schedule=schedule, mask_cfg=mask_cfg)
  sampler.precompile(labels, **kw)  # every scale's program compiled side by side, not one after another
  images = sampler.sample(labels, seed, **kw)
  return save_image_grid(out, np.asarray(images), nrow=per_class)


def write_mar_sample_grid(
  model,
  vae,
  out: str,
  *,
  classes=None,
  per_class: int = 8,
  num_iter: int = DEFAULT_NUM_ITER,
  cfg: float = MAR_CFG,
  cfg_schedule: str = DEFAULT_CFG_SCHEDULE,
  temperature: float = DEFAULT_TEMPERATURE,
  seed: int = 0,
) -> str:
  """Samples `per_class` images of each class from a MARModel and its KLVAE (one grid row per
  class) and writes a PNG. Options as `MARSampler.sample_tokens`; classes default to the first 10.
  Returns the path. Bad arguments and an unwritable `out` raise ValueError before anything is compiled.
  """
  check_mar_sampling_options(num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature)
  check_output_path(out)
  if per_class < 1:
    raise ValueError(f"per_class must be >= 1, got {per_class}")
  classes = list(range(min(10, model.num_classes))) if not classes else [int(c) for c in classes]
  _check_mar_classes(classes, model.num_classes)
  sampler = MARSampler(model, vae)
  labels = np.repeat(np.asarray(classes, np.int32), per_class)
  images = sampler.sample(labels, seed, num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature)
  return save_image_grid(out, np.asarray(images), nrow=per_class)


def write_himar_sample_grid(
  model,
  vae,
  out: str,
  *,
  classes=None,
  per_class: int = 8,
  num_iter: int = HIMAR_NUM_ITER,
  cfg: float = HIMAR_CFG,
  re_cfg: float = HIMAR_RE_CFG,
  cfg_schedule: str = DEFAULT_CFG_SCHEDULE,
  temperature: float = DEFAULT_TEMPERATURE,
  seed: int = 0,
) -> str:
  """Samples `per_class` images of each class from a Hi-MAR model (backbone, diffloss, cond_diffloss)
  and its KLVAE (one grid row per class) and writes a PNG. Options as `HiMARSampler.sample_stages`;
  classes default to the first 10. Returns the path. Bad arguments and an unwritable `out` raise
  ValueError before anything is compiled.
  """
  check_himar_sampling_options(
    num_iter=num_iter, cfg=cfg, re_cfg=re_cfg, cfg_schedule=cfg_schedule, temperature=temperature
  )
  check_output_path(out)
  if per_class < 1:
    raise ValueError(f"per_class must be >= 1, got {per_class}")
  sampler = HiMARSampler(model, vae)
  classes = list(range(min(10, sampler.num_classes))) if not classes else [int(c) for c in classes]
  _check_himar_classes(classes, sampler.num_classes)
  labels = np.repeat(np.asarray(classes, np.int32), per_class)
  images = sampler.sample(
    labels, seed, num_iter=num_iter, cfg=cfg, re_cfg=re_cfg, cfg_schedule=cfg_schedule, temperature=temperature
  )
  return save_image_grid(out, np.asarray(images), nrow=per_class)


def _check_himar_classes(classes: list[int], num_classes: int) -> None:
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f"class ids {bad} outside [0, {num_classes}) (Hi-MAR has no unconditional class id)")


def _check_mar_classes(classes: list[int], num_classes: int) -> None:
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f"class ids {bad} outside [0, {num_classes}) (MAR has no unconditional class id)")


def _parse_classes(text: str) -> list[int] | None:
  try:
    return [int(c) for c in text.split(",") if c.strip()] or None
  except ValueError:
    raise ValueError(f"--classes must be comma-separated class ids such as 0,1,2, got {text!r}") from None


def _check_family_flags(values: flags.FlagValues, family: str) -> None:
  """Refuses the options of another model family given on the command line (they would be ignored).

  family: 'mar', 'himar' or 'hmar' (HMAR / VAR)."""
  hmar_given = [f"--{n}" for n in HMAR_ONLY_FLAGS if values[n].present]
  mar_given = [f"--{n}" for n in MAR_ONLY_FLAGS if values[n].present]
  himar_given = [f"--{n}" for n in HIMAR_ONLY_FLAGS if values[n].present]
  if family == "mar":
    if hmar_given:
      raise ValueError(
        f"{', '.join(hmar_given)}: HMAR / VAR options, but {values.params} holds a MAR model "
        "(sampled with --num_iter, --cfg, --cfg_schedule and --temperature)"
      )
    if himar_given:
      raise ValueError(f"{', '.join(himar_given)}: a Hi-MAR option, but {values.params} holds a MAR model")
  elif family == "himar":
    if hmar_given:
      raise ValueError(
        f"{', '.join(hmar_given)}: HMAR / VAR options, but {values.params} holds a Hi-MAR model "
        "(sampled with --num_iter, --cfg, --re_cfg, --cfg_schedule and --temperature)"
      )
  else:
    if mar_given:
      raise ValueError(f"{', '.join(mar_given)}: MAR options, but {values.params} holds no MAR parameters")
    if himar_given:
      raise ValueError(f"{', '.join(himar_given)}: a Hi-MAR option, but {values.params} holds no Hi-MAR parameters")


def _mar_kwargs(values: flags.FlagValues) -> dict:
  cfg = MAR_CFG if values.cfg is None else values.cfg
  return dict(num_iter=values.num_iter, cfg=cfg, cfg_schedule=values.cfg_schedule, temperature=values.temperature)


def _himar_kwargs(values: flags.FlagValues) -> dict:
  return dict(
    num_iter=values.num_iter if values["num_iter"].present else HIMAR_NUM_ITER,
    cfg=HIMAR_CFG if values.cfg is None else values.cfg,
    re_cfg=values.re_cfg,
    cfg_schedule=values.cfg_schedule,
    temperature=values.temperature,
  )


def _sample_at_scale(values: flags.FlagValues, classes: list[int] | None) -> None:
  """--out_dir: every class (or --classes) --per_class times, over every device and host."""
  if values.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {values.batch_size}")
  os.makedirs(values.out_dir, exist_ok=True)
  sampler = sampler_from_checkpoints(values.params, values.tokenizer, use_kv_cache=True if values.kv_cache else None)
  classes = classes or list(range(sampler.num_classes))
  bad = [c for c in classes if not 0 <= c <= sampler.num_classes]
  if bad:
    raise ValueError(f"class ids {bad} outside [0, {sampler.num_classes}] ({sampler.num_classes} = unconditional)")
  schedule = validate_mask_schedule(values.mask_schedule, sampler.patch_nums)
  _to_dir(
    values,
    sampler,
    classes,
    cfg=HMAR_CFG if values.cfg is None else values.cfg,
    top_k=values.top_k,
    top_p=values.top_p,
    mask_schedule=schedule,
    mask_cfg=values.mask_cfg,
  )


def _sample_mar_at_scale(values: flags.FlagValues, classes: list[int] | None) -> None:
  """--out_dir for a MAR checkpoint (its options are recorded in OUT/sampling_run.json)."""
  if values.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {values.batch_size}")
  os.makedirs(values.out_dir, exist_ok=True)
  model = load_mar(values.params)
  sampler = MARSampler(model, load_kl_vae(values.tokenizer))
  classes = classes or list(range(model.num_classes))
  _check_mar_classes(classes, model.num_classes)
  _to_dir(values, sampler, classes, **_mar_kwargs(values))


def _sample_himar_at_scale(values: flags.FlagValues, classes: list[int] | None) -> None:
  """--out_dir for a Hi-MAR checkpoint (its options are recorded in OUT/sampling_run.json)."""
  from hmar_jax.models.himar_model import load_himar  # noqa: PLC0415

  if values.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {values.batch_size}")
  os.makedirs(values.out_dir, exist_ok=True)
  model = load_himar(values.params)
  sampler = HiMARSampler(model, load_kl_vae(values.tokenizer))
  classes = classes or list(range(sampler.num_classes))
  _check_himar_classes(classes, sampler.num_classes)
  _to_dir(values, sampler, classes, **_himar_kwargs(values))


def _to_dir(values: flags.FlagValues, sampler, classes: list[int], **sample_kwargs) -> None:
  t0 = time.time()
  path = sample_to_dir(
    sampler,
    values.out_dir,
    class_labels(classes, values.per_class),
    batch_size=values.batch_size,
    seed=values.seed,
    write_pngs=values.pngs,
    **sample_kwargs,
  )
  if path:
    print(f"wrote {path} and {os.path.join(values.out_dir, 'grid.png')} in {time.time() - t0:.1f}s")


def run(values: flags.FlagValues) -> None:
  """The command line's work, from parsed flags (main's; a test may pass its own FlagValues)."""
  if not values.params or not values.tokenizer:
    raise app.UsageError("--params and --tokenizer are required")
  # Everything that can be checked without the checkpoints, before loading them.
  classes = _parse_classes(values.classes)
  if values.per_class < 1:
    raise ValueError(f"--per_class must be >= 1, got {values.per_class}")
  if not values.out_dir:
    check_output_path(values.out)
  # The metadata (a small JSON file) says which family the checkpoint holds, before any weight is read.
  from hmar_jax.models.himar_model import PARAMS_KIND as HIMAR_PARAMS_KIND  # noqa: PLC0415

  kind = checkpoint.load_metadata(values.params).get("kind")
  family = {MAR_PARAMS_KIND: "mar", HIMAR_PARAMS_KIND: "himar"}.get(kind, "hmar")
  _check_family_flags(values, family)
  if family == "himar":
    _run_himar(values, classes)
    return
  if family == "mar":
    check_mar_sampling_options(**_mar_kwargs(values), prefix="--")
    if values.out_dir:
      _sample_mar_at_scale(values, classes)
      return
    model = load_mar(values.params)
    t0 = time.time()
    path = write_mar_sample_grid(
      model,
      load_kl_vae(values.tokenizer),
      values.out,
      classes=classes,
      per_class=values.per_class,
      seed=values.seed,
      **_mar_kwargs(values),
    )
    print(f"wrote samples to {path} in {time.time() - t0:.1f}s")
    return
  cfg = HMAR_CFG if values.cfg is None else values.cfg
  check_sampling_options(cfg=cfg, top_k=values.top_k, top_p=values.top_p, mask_cfg=values.mask_cfg, prefix="--")
  if values.mask_schedule.strip().lower() != "default":
    parse_mask_schedule(values.mask_schedule)  # the JSON; its fit to the model's scales is checked once loaded
  if values.out_dir:
    _sample_at_scale(values, classes)
    return
  t0 = time.time()
  sampler = sampler_from_checkpoints(values.params, values.tokenizer, use_kv_cache=True if values.kv_cache else None)
  path = sample_grid_to_png(
    sampler,
    values.out,
    classes=classes,
    per_class=values.per_class,
    cfg=cfg,
    top_k=values.top_k,
    top_p=values.top_p,
    mask_schedule=values.mask_schedule,
    mask_cfg=values.mask_cfg,
    seed=values.seed,
  )
  print(f"wrote samples to {path} in {time.time() - t0:.1f}s")


def _run_himar(values: flags.FlagValues, classes: list[int] | None) -> None:
  """A Hi-MAR checkpoint: --out grid or --out_dir at scale, options checked before loading it."""
  from hmar_jax.models.himar_model import load_himar  # noqa: PLC0415

  check_himar_sampling_options(**_himar_kwargs(values), prefix="--")
  if values.out_dir:
    _sample_himar_at_scale(values, classes)
    return
  model = load_himar(values.params)
  t0 = time.time()
  path = write_himar_sample_grid(
    model,
    load_kl_vae(values.tokenizer),
    values.out,
    classes=classes,
    per_class=values.per_class,
    seed=values.seed,
    **_himar_kwargs(values),
  )
  print(f"wrote samples to {path} in {time.time() - t0:.1f}s")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(FLAGS)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
