"""Multi-scale VQ tokenizer (VAR's VQVAE) in Flax NNX.

from hmar_jax.tokenizer import VQVAE, load_vqvae
vae = load_vqvae('checkpoints/vae_ch160v4096z32')       # converted official weights
indices = vae.encode_indices(images)                     # images (B, 256, 256, 3) in [-1, 1]
images_rec = vae.decode_indices(indices)                 # [(B, pn, pn) int32] -> (B, 256, 256, 3)
"""

from hmar_jax.tokenizer.quantizer import CodebookUsage, MultiScaleQuantizer
from hmar_jax.tokenizer.vqvae import VQVAE, abstract_vqvae, load_vqvae, save_vqvae, validate_config

__all__ = [
  "CodebookUsage",
  "MultiScaleQuantizer",
  "VQVAE",
  "abstract_vqvae",
  "load_vqvae",
  "save_vqvae",
  "validate_config",
]
