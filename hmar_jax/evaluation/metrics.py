"""The ADM evaluator's metrics (openai/guided-diffusion evaluations/evaluator.py), from features.

* FID / sFID: Frechet distance between Gaussians fitted to pool_3 (2048-d) / spatial (2023-d)
  features: mean and np.cov(rowvar=False); sqrtm of the covariance product with scipy, retried
  with 1e-6 added to both diagonals (and a warning) only when that square root is not finite;
  an imaginary part is dropped unless a diagonal entry's exceeds 1e-3 (then ValueError).
* Inception Score: exp(mean KL(p(y|x) || p(y))) of softmax(pool_3 @ W) over consecutive splits
  of 5000 (not shuffled), averaged over the splits; computed in float32 as the evaluator.
* Precision / recall (Kynkaanniemi et al. 2019, the evaluator's ManifoldEstimator, k = 3): the
  radius of each point is its squared distance to the 4th nearest point of its own set (the
  point itself is the 1st); precision = fraction of samples inside some reference ball
  (distance <= radius), recall = fraction of references inside some sample ball. Squared
  distances are max(|u|^2 - 2 u.v + |v|^2, 0), computed in float16 per 10000 x 10000 block and
  in float32 for a block where float16 is not finite, as the evaluator's DistanceBlock.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

FID_EPS = 1e-6
IS_SPLIT_SIZE = 5000
NEIGHBOURHOOD = 3
BLOCK = 10000  # the evaluator's row / column batch of pairwise distances


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """features [N, D] -> (mean [D] in the features' dtype, covariance [D, D] float64), as the evaluator."""
  return np.mean(features, axis=0), np.cov(features, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
  """scipy's matrix square root, silently (the evaluator's `disp=False`; SciPy >= 1.18 drops `disp`)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
      return linalg.sqrtm(a, disp=False)[0]
    except TypeError:
      return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = FID_EPS) -> float:
  """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)). Shapes [D], [D, D]."""
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(
      f"statistics of different sizes: means {mu1.shape} vs {mu2.shape}, covariances {sigma1.shape} vs {sigma2.shape}"
    )
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates", stacklevel=2)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(predictions: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """predictions [N, classes] (softmax rows) -> mean over consecutive splits of exp(E_x KL(p(y|x) || p(y)))."""
  preds = np.asarray(predictions)
  scores = []
  for start in range(0, len(preds), split_size):
    part = preds[start : start + split_size]
    marginal = np.mean(part, axis=0, keepdims=True)
    kl = np.sum(part * (np.log(part) - np.log(marginal)), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores))


@jax.jit
def softmax_predictions(pool: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
  """pool_3 [N, 2048] float32, logits weight [2048, 1008] -> softmax(pool @ weights) [N, 1008] float32."""
  logits = jnp.matmul(pool, weights, precision=jax.lax.Precision.HIGHEST)
  return jax.nn.softmax(logits, axis=-1)


def _to_half(x):
  """x rounded to float16's precision and range (kept float32): unlike astype(float16) round trips,
  which XLA may drop (excess precision), reduce_precision always rounds."""
  return jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)


def _squared_distances(u, v, half: bool):
  """u [R, D], v [C, D] float32 -> [R, C] max(|u|^2 - 2 u.v + |v|^2, 0) float32. half: every op's result
  rounded to float16, as TensorFlow's float16 graph (its reductions and matmul accumulate in float32)."""
  r = _to_half if half else (lambda x: x)
  u, v = r(u.astype(jnp.float32)), r(v.astype(jnp.float32))
  norm_u = r(jnp.sum(r(jnp.square(u)), axis=1))[:, None]
  norm_v = r(jnp.sum(r(jnp.square(v)), axis=1))[None, :]
  dot = r(jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST))
  return jnp.maximum(r(r(norm_u - r(2 * dot)) + norm_v), 0.0)


@jax.jit
def pairwise_distances(u: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  """u [R, D], v [C, D] -> squared distances [R, C] float32: the float16 result when all of it is finite,
  else the float32 one (the evaluator's DistanceBlock)."""
  d16 = _squared_distances(u, v, half=True)
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16, lambda: _squared_distances(u, v, half=False))


@functools.partial(jax.jit, static_argnames="k")
def _smallest(d: jnp.ndarray, k: int) -> jnp.ndarray:
  return -jax.lax.top_k(-d, k)[0]


def manifold_radii(features: np.ndarray, k: int = NEIGHBOURHOOD, block: int = BLOCK) -> np.ndarray:
  """features [N, D] -> [N] float32: squared distance of each point to its (k+1)-th nearest point of
  the set, itself included (so its k-th nearest neighbour)."""
  n = len(features)
  if n < k + 1:
    raise ValueError(f"precision / recall need at least {k + 1} feature vectors per set, got {n}")
  radii = np.zeros([n], np.float32)
  for r0 in range(0, n, block):
    rows = features[r0 : r0 + block]
    nearest = None
    for c0 in range(0, n, block):
      d = _smallest(pairwise_distances(rows, features[c0 : c0 + block]), min(k + 1, len(features[c0 : c0 + block])))
      nearest = d if nearest is None else _smallest(jnp.concatenate([nearest, d], axis=1), k + 1)
    radii[r0 : r0 + block] = np.asarray(nearest[:, k])
  return radii


@jax.jit
def _inside(d, radii_rows, radii_cols):
  """d [R, C] squared distances -> (row inside some column's ball [R], column inside some row's ball [C])."""
  return jnp.any(d <= radii_cols[None, :], axis=1), jnp.any(d <= radii_rows[:, None], axis=0)


def precision_recall(
  ref: np.ndarray, samples: np.ndarray, k: int = NEIGHBOURHOOD, block: int = BLOCK
) -> tuple[float, float]:
  """ref [N1, D], samples [N2, D] (pool_3 features) -> (precision, recall) with k-NN balls."""
  radii_ref, radii_samples = manifold_radii(ref, k, block), manifold_radii(samples, k, block)
  ref_in = np.zeros([len(ref)], bool)
  samples_in = np.zeros([len(samples)], bool)
  for r0 in range(0, len(ref), block):
    for c0 in range(0, len(samples), block):
      d = pairwise_distances(ref[r0 : r0 + block], samples[c0 : c0 + block])
      rows_in, cols_in = _inside(d, radii_ref[r0 : r0 + block], radii_samples[c0 : c0 + block])
      ref_in[r0 : r0 + block] |= np.asarray(rows_in)
      samples_in[c0 : c0 + block] |= np.asarray(cols_in)
  return float(np.mean(samples_in)), float(np.mean(ref_in))
