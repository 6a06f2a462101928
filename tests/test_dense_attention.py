"""Dense attention of the MAR / Hi-MAR backbones and the DiT head (hmar_jax/models/dense_attention.py).

The XLA path is checked against a float64 NumPy softmax attention; the cuDNN path runs only on a
CUDA GPU (bench/gpu_check_dense_attention.py checks it there against the same reference), so here
its choice and its refusals are specified.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hmar_jax.models import dense_attention as da
from hmar_jax.models import himar, himar_model, mar


def reference(q, k, v, kv_lengths=None):
  """float64 softmax(q k^T / sqrt(D)) v over (B, N, H, D) with keys >= kv_lengths[b] left out."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if kv_lengths is not None:
    valid = np.arange(k.shape[1])[None, :] < np.asarray(kv_lengths)[:, None]
    logits = np.where(valid[:, None, None, :], logits, -np.inf)
  logits -= logits.max(-1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def qkv(seed=0, b=3, n=10, h=2, d=8, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(kk, (b, n, h, d), jnp.float32).astype(dtype) for kk in keys]


def test_xla_attention_matches_a_float64_reference():
  q, k, v = qkv()
  got = da.dense_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), reference(q, k, v), rtol=1e-5, atol=1e-6)


def test_keys_past_a_rows_length_are_not_attended_to():
  q, k, v = qkv(seed=1)
  lengths = jnp.array([10, 4, 1], jnp.int32)
  got = da.dense_attention(q, k, v, kv_lengths=lengths, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), reference(q, k, v, lengths), rtol=1e-5, atol=1e-6)
  # what lies past a row's length does not change its output
  k2 = k.at[1, 4:].set(100.0)
  v2 = v.at[1, 4:].set(-7.0)
  again = da.dense_attention(q, k2, v2, kv_lengths=lengths, implementation="xla")
  np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(got[1]))


def test_probability_dropout_is_applied_on_the_xla_path():
  q, k, v = qkv(seed=2)
  got = da.dense_attention(q, k, v, implementation="xla", probs_dropout=lambda p: jnp.zeros_like(p))
  np.testing.assert_array_equal(np.asarray(got), 0.0)


def test_auto_is_xla_off_a_gpu():
  assert da.resolve_implementation("auto", dtype=jnp.bfloat16, head_dim=64, dropout=False, backend="cpu") == "xla"
  assert da.resolve_implementation("auto", dtype=jnp.bfloat16, head_dim=64, dropout=False, backend="tpu") == "xla"


def test_auto_is_cudnn_on_a_gpu_for_half_precision_without_dropout():
  assert da.resolve_implementation("auto", dtype=jnp.bfloat16, head_dim=64, dropout=False, backend="gpu") == "cudnn"
  assert da.resolve_implementation("auto", dtype=jnp.float16, head_dim=80, dropout=False, backend="cuda") == "cudnn"


@pytest.mark.parametrize(
  "dtype, head_dim, dropout",
  [(jnp.float32, 64, False), (jnp.bfloat16, 60, False), (jnp.bfloat16, 256, False), (jnp.bfloat16, 64, True)],
)
def test_auto_falls_back_to_xla_where_cudnn_cannot_run(dtype, head_dim, dropout):
  got = da.resolve_implementation("auto", dtype=dtype, head_dim=head_dim, dropout=dropout, backend="gpu")
  assert got == "xla"


def test_an_explicit_cudnn_that_cannot_run_names_why():
  with pytest.raises(ValueError, match="float32"):
    da.resolve_implementation("cudnn", dtype=jnp.float32, head_dim=64, dropout=False, backend="gpu")
  with pytest.raises(ValueError, match="dropout"):
    da.resolve_implementation("cudnn", dtype=jnp.bfloat16, head_dim=64, dropout=True, backend="gpu")


def test_an_unknown_implementation_is_refused():
  with pytest.raises(ValueError, match="flash"):
    da.resolve_implementation("flash", dtype=jnp.bfloat16, head_dim=64, dropout=False)


def test_a_mar_config_with_an_unknown_implementation_is_refused():
  c = mar.mar_config("tiny")
  c.attn_implementation = "flash"
  with pytest.raises(ValueError, match="MAR config: attention implementation"):
    mar.check_mar_config(c)


def test_a_mar_config_asking_cudnn_of_float32_is_refused():
  c = mar.mar_config("tiny")
  c.attn_implementation = "cudnn"
  with pytest.raises(ValueError, match="cudnn.*float32"):
    mar.check_mar_config(c)
  c.dtype = "bfloat16"
  mar.check_mar_config(c)  # bfloat16, head dim 16: runs


def test_a_himar_config_asking_cudnn_of_an_unfit_dit_head_is_refused():
  c = himar.himar_config("tiny")
  c.dtype = "bfloat16"
  c.attn_implementation = "cudnn"
  c.gdm_w, c.head = 60, 6  # head dim 10
  with pytest.raises(ValueError, match="DiT head.*multiple of 8"):
    himar_model.check_himar_model_config(himar_model.himar_model_config(c))


def test_a_stored_mar_config_without_the_field_means_auto():
  stored = ml_collections.ConfigDict({k: v for k, v in mar.mar_config("tiny").items() if k != "attn_implementation"})
  assert mar.attn_implementation(stored) == "auto"
