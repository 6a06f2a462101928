"""Memory of the MAR / Hi-MAR samplers' decode (hmar_jax/sampling/mar_generate.py `decode_tokens`).

The float32 KL decoder's full-resolution activations are the largest buffers of a sampling run; the
decode takes `chunk` images at a time, so its working memory is a few maps of chunk x H x W x ch floats
whatever the batch, and chunking changes no pixel (no op of the decoder mixes images).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from mar_sampling_helpers import tiny_kl_vae

from hmar_jax.sampling.mar_generate import decode_tokens

SEQ = 8  # the tiny KL VAE: 32 px images -> 8 x 8 latents of 16 channels (patch size 1)


def _decode_fn(vae, chunk: int):
  graphdef, state = nnx.split(vae)
  fn = jax.jit(lambda s, t: decode_tokens(nnx.merge(graphdef, s), t, 1, SEQ, SEQ, chunk))
  return fn, state


def _temp_bytes(vae, batch: int, chunk: int) -> int:
  """Temporary bytes of the compiled decode of `batch` images, `chunk` at a time."""
  fn, state = _decode_fn(vae, chunk)
  tokens = jax.ShapeDtypeStruct((batch, SEQ * SEQ, vae.embed_dim), jnp.float32)
  return fn.lower(state, tokens).compile().memory_analysis().temp_size_in_bytes


def test_a_chunked_decode_gives_the_images_of_a_whole_batch_decode_for_a_batch_not_a_multiple_of_the_chunk():
  vae = tiny_kl_vae(0)
  tokens = jax.random.normal(jax.random.key(3), (5, SEQ * SEQ, vae.embed_dim), jnp.float32)
  whole_fn, state = _decode_fn(vae, 5)
  chunked_fn, _ = _decode_fn(vae, 2)
  whole, chunked = np.asarray(whole_fn(state, tokens)), np.asarray(chunked_fn(state, tokens))
  assert chunked.shape == whole.shape == (5, 32, 32, 3)
  np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6)


def test_the_decode_working_memory_is_one_chunks_plus_the_batchs_own_tokens_and_images():
  vae = tiny_kl_vae(0)
  batch, chunk = 13, 2  # 13 is no multiple of 2: the last chunk is padded, not the whole batch decoded at once
  padded = 14
  side = SEQ * vae.downsample_factor
  per_image_io = 4 * (SEQ * SEQ * vae.embed_dim + side * side * 3)  # float32 tokens in, image out
  # Beyond one chunk's decode, only the (padded) batch's tokens and images may be held, each at most twice
  # (a padded or reshaped copy); a decode of the whole batch at once would hold every image's activations.
  assert _temp_bytes(vae, batch, chunk) <= _temp_bytes(vae, chunk, chunk) + 2 * padded * per_image_io
