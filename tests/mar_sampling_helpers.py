"""A random tiny MAR and KL VAE for the MAR sampling tests, made fast and the same in every process."""

from flax import nnx
from sampling_helpers import random_module

from hmar_jax.models.mar import mar_config
from hmar_jax.models.mar_model import MARModel
from hmar_jax.tokenizer.kl_vae import KLVAE, kl_vae_config


def tiny_mar_config():
  """mar_config('tiny') on the tiny KL VAE's latents: 16 px images, stride 4, 4 x 4 tokens of 16
  channels; 5 diffusion steps when sampling."""
  c = mar_config("tiny")
  c.img_size = 16
  c.vae_stride = 4
  c.num_sampling_steps = "5"
  return c


def tiny_mar(seed: int = 1) -> MARModel:
  return random_module(lambda: MARModel(tiny_mar_config(), rngs=nnx.Rngs(0)), seed, scale=0.05)


def tiny_kl_vae(seed: int = 0) -> KLVAE:
  return random_module(lambda: KLVAE(kl_vae_config("tiny"), rngs=nnx.Rngs(0)), seed, scale=0.1)
