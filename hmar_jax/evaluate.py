"""Sample quality with the ADM evaluator's protocol (openai/guided-diffusion evaluations/evaluator.py).

  python -m hmar_jax.evaluate samples.npz --ref VIRTUAL_imagenet256_labeled.npz \
      --inception classify_image_graph_def.pb

samples.npz: 'arr_0' uint8 [N, H, W, 3] (any size: resized to 299 as the evaluator's graph does).
--ref: a reference batch of guided-diffusion ('arr_0' images, and 'mu', 'sigma', 'mu_s', 'sigma_s'
statistics, used when present). --inception: classify_image_graph_def.pb, pytorch-fid's
pt_inception-2015-12-05-6726825d.pth, or a folder written by `python -m hmar_jax.evaluation.convert`.
Prints Inception Score, FID, sFID, precision and recall (and writes them to --out as JSON).
Features are cached per images file and weights in --cache_dir.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hmar_jax import cli
from hmar_jax.evaluation import metrics
from hmar_jax.evaluation.batches import ImageBatch, open_image_batch, reference_statistics
from hmar_jax.evaluation.convert import load_inception, weights_fingerprint
from hmar_jax.evaluation.features import FeatureExtractor, batch_features
from hmar_jax.evaluation.inception import InceptionV3

FLAGS = flags.FLAGS
SOFTMAX_BATCH = 512  # the evaluator's softmax batch (any batching gives the same rows)


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "hmar_jax", "inception_features")


def define_flags() -> None:
  flags.DEFINE_string("ref", None, "Reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz).")
  flags.DEFINE_string("inception", None, "Inception weights: .pb GraphDef, pytorch-fid .pth, or converted folder.")
  flags.DEFINE_integer("batch_size", 256, "Images per forward pass over all local devices.")
  flags.DEFINE_string("cache_dir", default_cache_dir(), "Feature cache folder ('' = no cache).")
  flags.DEFINE_string("out", "", "Optional JSON file for the results.")


def check_batches(samples: ImageBatch, ref: ImageBatch) -> None:
  """ValueError unless both sets are large enough for every metric (covariances, 3-NN balls)."""
  need = metrics.NEIGHBOURHOOD + 1
  for batch, what in ((samples, "samples file"), (ref, "reference batch")):
    if batch.shape[0] < need:
      raise ValueError(f"{what} {batch.path!r} holds {batch.shape[0]} images; the metrics need at least {need}")


def evaluate(
  samples: ImageBatch,
  ref: ImageBatch,
  model: InceptionV3,
  *,
  batch_size: int = 256,
  cache_dir: str | None = None,
  ref_stats: dict | None = None,
) -> dict[str, float]:
  """{'inception_score', 'fid', 'sfid', 'precision', 'recall'} of `samples` against `ref`."""
  fingerprint = weights_fingerprint(model)
  extractor = FeatureExtractor(model, batch_size)
  ref_pool, ref_spatial = batch_features(ref, extractor, fingerprint, cache_dir, "reference features")
  pool, spatial = batch_features(samples, extractor, fingerprint, cache_dir, "sample features")
  if ref_stats is None:
    (mu, sigma), (mu_s, sigma_s) = metrics.statistics(ref_pool), metrics.statistics(ref_spatial)
  else:
    mu, sigma, mu_s, sigma_s = (ref_stats[k] for k in ("mu", "sigma", "mu_s", "sigma_s"))
  weights = jnp.asarray(model.fc[...])
  preds = np.concatenate(
    [
      np.asarray(metrics.softmax_predictions(pool[i : i + SOFTMAX_BATCH], weights))
      for i in range(0, len(pool), SOFTMAX_BATCH)
    ]
  )
  precision, recall = metrics.precision_recall(ref_pool, pool)
  return {
    "inception_score": metrics.inception_score(preds),
    "fid": metrics.frechet_distance(*metrics.statistics(pool), mu, sigma),
    "sfid": metrics.frechet_distance(*metrics.statistics(spatial), mu_s, sigma_s),
    "precision": precision,
    "recall": recall,
  }


def _check_out(out: str) -> None:
  folder = os.path.dirname(os.path.abspath(out))
  if os.path.isdir(out) or not os.path.isdir(folder):
    raise ValueError(f"--out {out!r} must be a file in an existing folder")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("give one samples .npz: python -m hmar_jax.evaluate samples.npz --ref REF.npz --inception W")
  if not FLAGS.ref or not FLAGS.inception:
    raise app.UsageError("--ref and --inception are required")
  if FLAGS.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
  if FLAGS.out:
    _check_out(FLAGS.out)
  # Every input is checked (headers, statistics, weights) before anything is compiled.
  samples = open_image_batch(argv[1], "samples file")
  ref = open_image_batch(FLAGS.ref, "reference batch")
  check_batches(samples, ref)
  ref_stats = reference_statistics(ref)
  model = load_inception(FLAGS.inception)
  results = evaluate(
    samples, ref, model, batch_size=FLAGS.batch_size, cache_dir=FLAGS.cache_dir or None, ref_stats=ref_stats
  )
  labels = {
    "inception_score": "Inception Score",
    "fid": "FID",
    "sfid": "sFID",
    "precision": "Precision",
    "recall": "Recall",
  }
  for key, label in labels.items():
    print(f"{label}: {results[key]}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
