"""Command line: convert an official PyTorch checkpoint into an hmar_jax orbax checkpoint.

  python -m hmar_jax.convert vqvae SRC.pth DST [--config configs/vqvae.py[:256|512|1024|tiny]]
  python -m hmar_jax.convert var   SRC.pth DST [--config configs/var.py:d16]
  python -m hmar_jax.convert hmar  SRC.pth DST [--config configs/hmar.py:d16]
  python -m hmar_jax.convert mar   checkpoint-last.pth DST [--config FILE.py[:variant]] [--no_ema]
  python -m hmar_jax.convert himar checkpoint-last.pth DST [--config FILE.py[:variant]] [--no_ema]
  python -m hmar_jax.convert kl_vae kl16.ckpt DST [--config configs/kl_tokenizer.py:kl16]

(var / hmar / mar / himar infer the architecture from the tensor shapes when --config is not given;
mar and himar convert the EMA weights 'model_ema', which the official evaluation samples with, unless
--no_ema; kl_vae defaults to MAR's kl16 architecture.)

DST must not exist. Any missing, unexpected or mis-shaped tensor, and any tensor holding NaN / Inf
or integers where float weights go, is reported by name and nothing is written. Exit status: 0 on
success, 2 on a conversion error or a destination that cannot be written (one `error:` line).
"""

from __future__ import annotations

import argparse
import os
import sys

from hmar_jax.config_utils import load_config_file
from hmar_jax.convert.himar import convert_himar_file
from hmar_jax.convert.hmar import convert_hmar_file
from hmar_jax.convert.kl_vae import convert_kl_vae_file
from hmar_jax.convert.mar import convert_mar_file
from hmar_jax.convert.var import convert_var_file
from hmar_jax.convert.vqvae import convert_vqvae_file

_TRANSFORMER_CONVERTERS = {"var": convert_var_file, "hmar": convert_hmar_file}

_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def _default_config(name: str) -> str | None:
  for root in (_REPO_CONFIGS, os.path.join(os.getcwd(), "configs")):
    path = os.path.join(root, name)
    if os.path.isfile(path):
      return path
  return None


def _convert_vqvae(args) -> str:
  spec = args.config or _default_config("vqvae.py")
  if spec is None:
    raise SystemExit("no --config given and configs/vqvae.py not found")
  return convert_vqvae_file(args.src, args.dst, load_config_file(spec))


def _convert_transformer(kind: str, args) -> str:
  """var / hmar: convert_var_file / convert_hmar_file (the transformer converters).

  Without --config the architecture (depth, width, ...) is inferred from the tensor shapes.
  """
  config = load_config_file(args.config) if args.config else None
  return _TRANSFORMER_CONVERTERS[kind](args.src, args.dst, config)


def _model_block(config):
  """The model block of a full config (training configs hold it as .model) or the block itself."""
  return config.model if "model" in config else config


def _convert_mar(args) -> str:
  """mar: convert_mar_file; without --config the architecture is inferred from the shapes."""
  config = _model_block(load_config_file(args.config)) if args.config else None
  return convert_mar_file(args.src, args.dst, config, ema=not args.no_ema)


def _convert_himar(args) -> str:
  """himar: convert_himar_file; without --config the architecture is inferred from the shapes."""
  config = _model_block(load_config_file(args.config)) if args.config else None
  return convert_himar_file(args.src, args.dst, config, ema=not args.no_ema)


def _convert_kl_vae(args) -> str:
  """kl_vae: convert_kl_vae_file; without --config MAR's kl16 architecture."""
  config = _model_block(load_config_file(args.config)) if args.config else None
  return convert_kl_vae_file(args.src, args.dst, config)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m hmar_jax.convert", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="kind", required=True)
  for kind, what in (
    ("vqvae", "official VQVAE (vae_ch160v4096z32.pth)"),
    ("var", "official VAR transformer"),
    ("hmar", "official HMAR transformer"),
    ("mar", "official MAR (checkpoint-last.pth: backbone and diffusion head)"),
    ("himar", "official Hi-MAR (checkpoint-last.pth: backbone and both diffusion heads)"),
    ("kl_vae", "official MAR KL-16 VAE (kl16.ckpt)"),
  ):
    p = sub.add_parser(kind, help=f"convert an {what} state_dict")
    p.add_argument("src", help="PyTorch .pth file")
    p.add_argument("dst", help="output checkpoint directory (must not exist)")
    p.add_argument(
      "--config",
      default=None,
      help="ml_collections config file, optionally with ':variant' (e.g. configs/vqvae.py:512)",
    )
    if kind in ("mar", "himar"):
      p.add_argument(
        "--no_ema", action="store_true", help="convert the raw weights 'model' instead of the EMA weights 'model_ema'"
      )
  args = parser.parse_args(argv)
  try:
    if args.kind == "vqvae":
      _convert_vqvae(args)
    elif args.kind == "mar":
      _convert_mar(args)
    elif args.kind == "himar":
      _convert_himar(args)
    elif args.kind == "kl_vae":
      _convert_kl_vae(args)
    else:
      _convert_transformer(args.kind, args)
  except (ValueError, FileExistsError, FileNotFoundError) as e:  # ConversionError, CheckpointWriteError, ...
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
