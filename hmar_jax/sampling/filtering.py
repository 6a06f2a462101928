"""Top-k / top-p filtering of logits and sampling (official models/helpers.sample_with_top_k_top_p_).

Semantics follow the official helper:
- top_k > 0 keeps the logits >= the k-th largest (ties at the boundary are kept);
- top_p > 0 then sorts the top-k-filtered logits ascending, and drops those whose
  cumulative probability (from the least likely upwards) is <= 1 - top_p; the most
  likely token is always kept. Implemented as a threshold on the logit value, so a
  token tied in value with the last kept one is kept too (official breaks such ties by
  sort order).
- removed logits become -inf; the distribution sampled is softmax(filtered logits).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_top_p_filter(logits: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
  """Filters (..., V) logits; returns the same shape with removed entries set to -inf.

  `top_k` must be a Python int (it fixes a shape); `top_p` may be traced.
  """
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  if top_k and 0 < top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if not isinstance(top_p, (int, float)) or top_p > 0:
    ascending = jnp.sort(logits, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop = cum <= 1.0 - top_p
    drop = drop.at[..., -1].set(False)
    # The dropped entries are a prefix of the ascending order: the first kept one is the threshold.
    first_kept = jnp.sum(drop, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ascending, first_kept, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample_tokens(key: jax.Array, logits: jax.Array, top_k: int = 0, top_p: float = 0.0
                  ) -> tuple[jax.Array, jax.Array]:
  """Draws one token per position from filtered (..., V) logits.

  Returns:
    (tokens (...,) int32, confidence (...,) float32): confidence is the probability of
    the drawn token under the filtered distribution (what the official sampler ranks
    when deciding which tokens to re-mask).
  """
  filtered = top_k_top_p_filter(logits, top_k, top_p)
  tokens = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
  probs = jax.nn.softmax(filtered, axis=-1)
  confidence = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
  return tokens, confidence
