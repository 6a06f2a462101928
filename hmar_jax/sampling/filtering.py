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


def top_k_top_p_filter(logits: jax.Array, top_k: int | jax.Array = 0, top_p: float | jax.Array = 0.0) -> jax.Array:
  """Filters (..., V) logits; returns the same shape with removed entries set to -inf.

  Both `top_k` (<= 0 or >= V: off) and `top_p` (<= 0: off) may be traced values, so one
  compiled sampler serves every setting. One descending sort serves both filters.
  """
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  desc = -jnp.sort(-logits, axis=-1)
  k = jnp.asarray(top_k, jnp.int32)
  k = jnp.where((k > 0) & (k < vocab), k, vocab)
  kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, desc.shape[:-1] + (1,)), axis=-1)
  logits = jnp.where(logits < kth, -jnp.inf, logits)
  desc = jnp.where(desc < kth, -jnp.inf, desc)
  # Official: ascending cumulative probability of the top-k-filtered distribution; entries with
  # cumsum <= 1 - top_p are dropped, never the most likely one. In descending order the dropped
  # entries form a suffix, so the last kept value is a threshold.
  probs = jax.nn.softmax(desc, axis=-1)
  cum_ascending = jnp.flip(jnp.cumsum(jnp.flip(probs, -1), axis=-1), -1)
  top_p = jnp.asarray(top_p, jnp.float32)
  drop = (cum_ascending <= 1.0 - top_p) & (top_p > 0)
  drop = drop.at[..., 0].set(False)
  keep = vocab - jnp.sum(drop, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(desc, keep - 1, axis=-1)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_tokens(
  key: jax.Array, logits: jax.Array, top_k: int | jax.Array = 0, top_p: float | jax.Array = 0.0
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
