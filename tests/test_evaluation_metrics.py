"""The ADM evaluator's metrics from features: Frechet distance, Inception Score, precision / recall."""

import warnings

import numpy as np
import pytest
from scipy import linalg

from hmar_jax.evaluation import metrics


def _random_covariance(rng, d, n):
  x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
  return np.cov(x, rowvar=False)


def _reference_frechet(mu1, s1, mu2, s2):
  """Float64 reference: tr sqrt(S1 S2) = sum of sqrt eigenvalues of S1^1/2 S2 S1^1/2 (symmetric PSD)."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_frechet_distance_matches_an_eigendecomposition_reference():
  rng = np.random.default_rng(0)
  d = 16
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = _random_covariance(rng, d, 200), _random_covariance(rng, d, 300)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, _reference_frechet(mu1, s1, mu2, s2), rtol=1e-8)


def test_frechet_distance_of_identical_statistics_is_zero():
  rng = np.random.default_rng(1)
  s = _random_covariance(rng, 8, 100)
  assert abs(metrics.frechet_distance(np.ones(8), s, np.ones(8), s)) < 1e-8


def test_a_non_finite_square_root_is_retried_with_eps_on_both_diagonals_and_warns(monkeypatch):
  rng = np.random.default_rng(2)
  d = 6
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = _random_covariance(rng, d, 50), _random_covariance(rng, d, 50)
  real_sqrtm, calls = linalg.sqrtm, []

  def first_call_fails(a, **kwargs):
    calls.append(a)
    if len(calls) == 1:
      return np.full_like(a, np.inf), 0.0
    return real_sqrtm(a, **kwargs)

  monkeypatch.setattr(metrics.linalg, "sqrtm", first_call_fails)
  with pytest.warns(UserWarning, match="singular product"):
    got = metrics.frechet_distance(mu1, s1, mu2, s2, eps=1e-2)
  np.testing.assert_allclose(calls[1], (s1 + 1e-2 * np.eye(d)) @ (s2 + 1e-2 * np.eye(d)))
  # The traces stay those of the unshifted covariances; only the square root sees eps.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    root = np.real(real_sqrtm(calls[1]))
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_a_finite_square_root_is_not_retried():
  rng = np.random.default_rng(3)
  s = _random_covariance(rng, 5, 40)
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    metrics.frechet_distance(np.zeros(5), s, np.ones(5), s)


def test_statistics_are_the_mean_and_the_unbiased_covariance_of_the_rows():
  x = np.random.default_rng(4).standard_normal((50, 3)).astype(np.float32)
  mu, sigma = metrics.statistics(x)
  centred = x.astype(np.float64) - x.astype(np.float64).mean(0)
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-5)
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-5)


def _softmax(logits):
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_uniform_predictions_score_one():
  preds = _softmax(np.zeros((20, 10), np.float32))
  assert metrics.inception_score(preds) == pytest.approx(1.0, abs=1e-5)


def test_confident_predictions_of_distinct_classes_score_the_number_of_classes():
  n = 7
  preds = _softmax(60.0 * np.eye(n, dtype=np.float32))
  assert metrics.inception_score(preds) == pytest.approx(n, rel=1e-4)


def test_the_score_is_the_mean_over_consecutive_unshuffled_splits():
  uniform = _softmax(np.zeros((4, 4), np.float32))  # scores 1
  confident = _softmax(60.0 * np.eye(4, dtype=np.float32))  # scores 4
  preds = np.concatenate([uniform, confident])
  assert metrics.inception_score(preds, split_size=4) == pytest.approx((1 + 4) / 2, rel=1e-4)


def test_softmax_predictions_use_the_weight_without_bias():
  rng = np.random.default_rng(5)
  pool, w = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((8, 5)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(metrics.softmax_predictions(pool, w)), _softmax(pool @ w), rtol=1e-5)


def _line(xs, dims=4):
  """Points at x = xs on the first axis of a `dims`-dimensional space."""
  pts = np.zeros((len(xs), dims), np.float32)
  pts[:, 0] = xs
  return pts


def test_radii_are_the_squared_distance_to_the_third_nearest_other_point():
  # Points 0..9 on a line: 3rd nearest other point is at distance 2 inside, 3 at either end.
  radii = metrics.manifold_radii(_line(np.arange(10.0)))
  np.testing.assert_array_equal(radii, [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])


def test_identical_sets_have_full_precision_and_recall():
  pts = np.random.default_rng(6).standard_normal((30, 8)).astype(np.float32)
  assert metrics.precision_recall(pts, pts.copy()) == (1.0, 1.0)


def test_far_apart_sets_have_zero_precision_and_recall():
  pts = np.random.default_rng(7).standard_normal((30, 8)).astype(np.float32)
  assert metrics.precision_recall(pts, pts + 100.0) == (0.0, 0.0)


def test_samples_covering_part_of_the_reference_have_full_precision_and_partial_recall():
  # Reference 0..9; samples 0..4 (radius^2 9 at the ends) cover reference points 0..7: recall 8/10.
  ref, samples = _line(np.arange(10.0)), _line(np.arange(5.0))
  assert metrics.precision_recall(ref, samples) == (1.0, 0.8)


def test_distances_beyond_float16_range_fall_back_to_float32():
  # Scaled by 100, squared norms reach 8e5 > 65504 (float16 overflows); the answer is unchanged.
  ref, samples = _line(100.0 * np.arange(10.0)), _line(100.0 * np.arange(5.0))
  assert metrics.precision_recall(ref, samples) == (1.0, 0.8)


def test_blocking_does_not_change_the_answer():
  ref, samples = _line(np.arange(10.0)), _line(np.arange(5.0))
  assert metrics.precision_recall(ref, samples, block=3) == (1.0, 0.8)
  np.testing.assert_array_equal(metrics.manifold_radii(_line(np.arange(10.0)), block=4), [9] + [4] * 8 + [9])


def test_squared_distances_are_clamped_at_zero_despite_float16_rounding():
  rng = np.random.default_rng(8)
  u = rng.uniform(0, 2, (64, 2048)).astype(np.float32)  # pool_3-like magnitudes
  v = u + rng.normal(0, 1e-2, u.shape).astype(np.float32)  # near-duplicates: |u|^2 - 2 u.v + |v|^2 ~ 0
  d = np.asarray(metrics.pairwise_distances(u, v))
  assert d.dtype == np.float32 and d.min() >= 0.0
