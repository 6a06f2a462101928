"""Random tiny models for the sampling tests, made fast and the same in every process."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax import config_utils
from hmar_jax.models.config import tiny_model_config
from hmar_jax.models.transformer import ScaleTransformer
from hmar_jax.sampling import Sampler
from hmar_jax.tokenizer.vqvae import VQVAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_module(ctor, seed: int, scale: float = 0.3):
  """A module with N(0, scale^2) weights everywhere, built abstractly and filled from NumPy (eager
  initialisation would compile every op once, seconds on a loaded CPU). Such a model has sharp
  logits, so greedy decoding has no near-ties."""
  graphdef, state = nnx.split(nnx.eval_shape(ctor))
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), state))


def tiny_vqvae_config():
  return config_utils.load_config_file(os.path.join(ROOT, "configs", "vqvae.py:tiny"))


def tiny_vqvae(seed: int = 0):
  return random_module(lambda: VQVAE(tiny_vqvae_config(), rngs=nnx.Rngs(0)), seed, scale=0.1)


def tiny_transformer(kind: str, seed: int):
  return random_module(lambda: ScaleTransformer(tiny_model_config(kind), rngs=nnx.Rngs(0)), seed)


def tiny_hmar_sampler() -> Sampler:
  """The tiny HMAR (seed 1) over the tiny tokenizer (seed 0)."""
  return Sampler(tiny_transformer("hmar", 1), tiny_vqvae(0))
