"""The quick-start job: every stage of HMAR on the built-in data, on CPU, in about fifteen minutes.

  python -m hmar_jax.main [--workdir=runs/quickstart] [--config=configs/quickstart.py]

1. trains the multi-scale VQ tokenizer  -> WORKDIR/tokenizer/reconstructions.png
2. trains HMAR next-scale prediction    -> WORKDIR/nsp/params
3. masked-prediction finetuning         -> WORKDIR/mask/params
4. samples every class                  -> WORKDIR/samples.png (one row per class)
Each stage resumes from its checkpoints, so an interrupted run continues where it stopped.

  python -m hmar_jax.main --family=mar [--workdir=runs/quickstart_mar]
  python -m hmar_jax.main --family=himar [--workdir=runs/quickstart_himar]

runs MAR (or Hi-MAR) instead (configs/quickstart.py:mar / :himar): the KL VAE tokenizer ->
WORKDIR/tokenizer, the model with its diffusion loss -> WORKDIR/{mar,himar}/params, and
WORKDIR/samples.png.
"""

from __future__ import annotations

import os
import sys
import time

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from hmar_jax import cli
from hmar_jax.cli import stop_report
from hmar_jax.models.mar_model import load_mar
from hmar_jax.sample import check_output_path, load_transformer, write_mar_sample_grid, write_sample_grid
from hmar_jax.sampling import check_sampling_options, validate_mask_schedule
from hmar_jax.tokenizer.kl_vae import load_kl_vae
from hmar_jax.tokenizer.vqvae import load_vqvae
from hmar_jax.training import schema
from hmar_jax.training.trainer import train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py")


def _train_stage(config, workdir: str) -> dict:
  """One stage's training; a stage stopped by Ctrl-C or SIGTERM (checkpoint saved) ends the job
  with the training command's line and exit status, not with the next stage's missing inputs."""
  result = train(config, workdir)
  stopped = stop_report(result)
  if stopped is not None:
    status, line = stopped
    print(line.replace("rerun the same command", "rerun python -m hmar_jax.main"), file=sys.stderr)
    sys.exit(status)
  return result


def define_flags() -> None:
  """Defines this command line's flags. Called only when the module runs as a program, so that
  importing it (for run_quickstart) defines no --config next to another command line's."""
  # No default here: DEFINE_config_file loads a default (and applies the overrides) when it is
  # defined, before cli.run could turn a mistake into one line; cli.run supplies it instead.
  config_flags.DEFINE_config_file(
    "config", None, "Quick-start config (default configs/quickstart.py).", lock_config=False
  )
  flags.DEFINE_string("workdir", None, "Output folder (default runs/quickstart, or runs/quickstart_<family>).")
  flags.DEFINE_enum("family", "hmar", FAMILIES, "Model family: hmar (VQ tokenizer, HMAR), mar or himar (KL VAE).")


FAMILIES = ("hmar", "mar", "himar")


def family_from_argv(argv: list[str]) -> str:
  """The --family value on a command line (read before the flags are parsed: it picks the default
  config file, which config_flags loads while parsing)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--family="):
      return arg.split("=", 1)[1]
    if arg == "--family" and i + 1 < len(argv):
      return argv[i + 1]
  return "hmar"


def _mask_stage_config(config, nsp_workdir: str, init_from: str) -> ml_collections.ConfigDict:
  """The finetuning config: the next-scale stage's images and token cache, its parameters."""
  mask_config = config.mask
  mask_config.init_from = init_from
  mask_config.data = ml_collections.ConfigDict(config.nsp.data.to_dict())
  mask_config.data.tokens_cache = os.path.join(nsp_workdir, "tokens")
  return mask_config


def _family(config) -> str:
  return "himar" if "himar" in config else "mar"


def check_mar_quickstart(config, workdir: str) -> None:
  """check_quickstart for MAR's and Hi-MAR's quick starts (sections tokenizer, mar or himar, sample)."""
  family = _family(config)
  missing = [k for k in ("tokenizer", family, "sample") if k not in config]
  if missing:
    raise ValueError(
      f"MAR's quick-start config has sections tokenizer, mar (or himar) and sample (configs/quickstart.py:mar); "
      f"this one lacks {', '.join(missing)}"
    )
  copy = ml_collections.ConfigDict(config.to_dict())
  for stage in ("tokenizer", family):
    try:
      schema.validate(copy[stage])
    except schema.ConfigError as e:
      raise schema.ConfigError(f"quick-start stage config.{stage}: {e}") from None
  sample = ml_collections.ConfigDict(copy[family].to_dict())
  for key in config.sample:
    if key not in sample.sample:
      raise schema.ConfigError(f"unknown config key config.sample.{key}; valid: {', '.join(sorted(sample.sample))}")
    sample.sample[key] = config.sample[key]
  schema.validate(sample)  # the sampling settings, named config.sample.*
  check_output_path(os.path.join(workdir, "samples.png"))


def run_mar_quickstart(config, workdir: str) -> dict:
  """KL VAE tokenizer -> MAR or Hi-MAR -> samples; returns the paths of what each wrote."""
  family = _family(config)
  check_mar_quickstart(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  out = {}
  stages = ("KL VAE tokenizer", "Hi-MAR" if family == "himar" else "MAR", "sampling")
  t0 = time.time()
  print(f"\n== stage 1/{len(stages)}: {stages[0]} ==", flush=True)
  tok = _train_stage(config.tokenizer, os.path.join(workdir, "tokenizer"))
  out["reconstructions"] = tok["png"]
  print(f"\n== stage 2/{len(stages)}: {stages[1]} ==", flush=True)
  model_config = config[family]
  model_config.tokenizer.checkpoint = tok["tokenizer"]
  trained = _train_stage(model_config, os.path.join(workdir, family))
  out[f"{family}_params"] = trained["params"]
  print(f"\n== stage 3/{len(stages)}: {stages[2]} ==", flush=True)
  s = config.sample
  kw = dict(
    classes=list(range(min(10, int(model_config.data.num_classes), int(model_config.model.class_num)))),
    per_class=int(s.per_class),
    num_iter=int(s.num_iter),
    cfg=float(s.cfg),
    cfg_schedule=str(s.cfg_schedule),
    temperature=float(s.temperature),
    seed=int(s.seed),
  )
  vae = load_kl_vae(tok["tokenizer"])
  path = os.path.join(workdir, "samples.png")
  if family == "himar":
    from hmar_jax.models.himar_model import load_himar  # noqa: PLC0415
    from hmar_jax.sample import write_himar_sample_grid  # noqa: PLC0415

    out["samples"] = write_himar_sample_grid(load_himar(trained["params"]), vae, path, re_cfg=float(s.re_cfg), **kw)
  else:
    out["samples"] = write_mar_sample_grid(load_mar(trained["params"]), vae, path, **kw)
  print(f"\ndone in {(time.time() - t0) / 60:.1f} min:")
  for name, path in out.items():
    print(f"  {name}: {path}")
  return out


def check_quickstart(config, workdir: str) -> None:
  """Raises ValueError naming the first problem of any stage, before the first one starts (a
  mistake in the sampling settings would otherwise surface after all the training)."""
  missing = [k for k in ("tokenizer", "nsp", "mask", "sample") if k not in config]
  if missing:
    raise ValueError(
      f"a quick-start config has sections tokenizer, nsp, mask and sample (configs/quickstart.py); this one lacks "
      f"{', '.join(missing)} (a training config runs with python -m hmar_jax.train)"
    )
  copy = ml_collections.ConfigDict(config.to_dict())
  # The next-scale stage's parameters are not there yet: any existing folder stands in for them.
  stages = {
    "tokenizer": copy.tokenizer,
    "nsp": copy.nsp,
    "mask": _mask_stage_config(copy, os.path.join(workdir, "nsp"), os.curdir),
  }
  for stage, c in stages.items():
    try:
      schema.validate(c)
    except schema.ConfigError as e:
      raise schema.ConfigError(f"quick-start stage config.{stage}: {e}") from None
  s = config.sample
  if not isinstance(s.per_class, int) or s.per_class < 1:
    raise ValueError(f"config.sample.per_class must be an int >= 1, got {s.per_class!r}")
  check_sampling_options(cfg=s.cfg, top_k=s.top_k, top_p=s.top_p, prefix="config.sample.")
  try:
    validate_mask_schedule(s.mask_schedule, config.mask.model.patch_nums)
  except ValueError as e:
    raise ValueError(f"config.sample.mask_schedule: {e}") from None
  check_output_path(os.path.join(workdir, "samples.png"))


def run_quickstart(config, workdir: str) -> dict:
  """Runs the four stages; returns the paths of what each wrote."""
  check_quickstart(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  out = {}
  stages = ("tokenizer", "next-scale", "masked finetune", "sampling")

  def banner(i):
    print(f"\n== stage {i + 1}/{len(stages)}: {stages[i]} ==", flush=True)

  t0 = time.time()
  banner(0)
  tok_dir = os.path.join(workdir, "tokenizer")
  tok = _train_stage(config.tokenizer, tok_dir)
  out["reconstructions"] = tok["png"]
  tokenizer_ckpt = tok["tokenizer"]

  banner(1)
  nsp_config = config.nsp
  nsp_config.tokenizer.checkpoint = tokenizer_ckpt
  nsp = _train_stage(nsp_config, os.path.join(workdir, "nsp"))
  out["nsp_params"] = nsp["params"]

  banner(2)
  mask_config = _mask_stage_config(config, os.path.join(workdir, "nsp"), nsp["params"])
  mask_config.tokenizer.checkpoint = tokenizer_ckpt
  mask = _train_stage(mask_config, os.path.join(workdir, "mask"))
  out["mask_params"] = mask["params"]

  banner(3)
  s = config.sample
  out["samples"] = write_sample_grid(
    load_transformer(mask["params"]),
    load_vqvae(tokenizer_ckpt),
    os.path.join(workdir, "samples.png"),
    per_class=s.per_class,
    cfg=s.cfg,
    top_k=s.top_k,
    top_p=s.top_p,
    mask_schedule=s.mask_schedule,
    seed=s.seed,
  )
  print(f"\ndone in {(time.time() - t0) / 60:.1f} min:")
  for name, path in out.items():
    print(f"  {name}: {path}")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  family, config = flags.FLAGS.family, flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join("runs", "quickstart" if family == "hmar" else f"quickstart_{family}")
  if family in ("mar", "himar"):
    if family not in config:
      raise ValueError(f"--family={family} needs its quick-start config (configs/quickstart.py:{family})")
    run_mar_quickstart(config, workdir)
  else:
    run_quickstart(config, workdir)


if __name__ == "__main__":
  define_flags()
  family = family_from_argv(sys.argv)
  cli.run(main, default_configs={"config": _DEFAULT_CONFIG + ("" if family == "hmar" else f":{family}")})
