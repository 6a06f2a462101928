"""Converters from official PyTorch checkpoints to hmar_jax orbax checkpoints.

  python -m hmar_jax.convert vqvae vae_ch160v4096z32.pth checkpoints/vae   [--config configs/vqvae.py:256]
  python -m hmar_jax.convert var   var_d16.pth checkpoints/var_d16           [--config configs/var.py:d16]
  python -m hmar_jax.convert hmar  hmar_d16.pth checkpoints/hmar_d16         [--config configs/hmar.py:d16]
  python -m hmar_jax.convert kl_vae kl16.ckpt checkpoints/kl16                [--config configs/kl_tokenizer.py:kl16]
  python -m hmar_jax.convert mar   checkpoint-last.pth checkpoints/mar_large [--no_ema]

PyTorch is needed only here (the optional `torch` extra).
"""

from hmar_jax.convert.common import ConversionError

__all__ = ["ConversionError"]
