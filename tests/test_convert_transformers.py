"""Converters of official VAR / HMAR transformer state_dicts (hmar_jax/convert/{var,hmar}.py).

Fake state_dicts carry the official key names and shapes with random values; the converted model's
logits are compared with an independent float64 PyTorch implementation of the official forward
(VAR models/var.py + basic_var.py, HMAR models/hmar.py + mp.py) run on the same state_dict.
"""

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from hmar_jax import checkpoint
from hmar_jax.convert.common import ConversionError
from hmar_jax.convert.hmar import convert_hmar_file, convert_hmar_state_dict, expected_hmar_shapes
from hmar_jax.convert.var import convert_var_state_dict, expected_var_shapes, infer_model_config
from hmar_jax.models import ScaleTransformer, model_config
from pallas_kernels import patterns

PATCH_NUMS = (1, 2, 3, 4)
L = 30
B = 2


def tiny(kind, pattern=None):
  m = model_config(
    3,
    kind=kind,
    patch_nums=PATCH_NUMS,
    width=64,
    num_heads=2,
    vocab_size=48,
    cvae=8,
    num_classes=10,
    mask_layers=2 if kind == "hmar" else 0,
  )
  m.attn_implementation = "xla"
  if pattern:
    m.pattern = pattern
  return m


def fake_state_dict(shapes, m, seed=0):
  """Random values under the official keys; buffers as the official constructor makes them."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in shapes.items():
    if key.endswith("zero_k_bias"):
      sd[key] = np.zeros(shape, np.float32)
    elif key == "lvl_1L":
      sd[key] = patterns.scale_ids(m.patch_nums)[None].astype(np.int64)
    elif key == "attn_bias_for_masking":
      allowed = patterns.dense_mask(m.patch_nums, m.pattern)
      sd[key] = np.where(allowed, 0.0, -np.inf).astype(np.float32)[None, None]
    elif key.endswith("scale_mul_1H11"):
      sd[key] = (math.log(4.0) + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    else:
      sd[key] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
  return sd


# ------------------------------------------------------------------ independent torch reference
def t(sd, key):
  return torch.from_numpy(np.asarray(sd[key])).double()


def ref_block(sd, p, x, cond, heads, attn_mask):
  b, n, c = x.shape
  g1, g2, s1, s2, sh1, sh2 = (
    F.linear(F.silu(cond), t(sd, f"{p}.ada_lin.1.weight"), t(sd, f"{p}.ada_lin.1.bias")).view(-1, 1, 6, c).unbind(2)
  )
  h = F.layer_norm(x, (c,), eps=1e-6) * (s1 + 1) + sh1
  bias = torch.cat([t(sd, f"{p}.attn.q_bias"), torch.zeros(c, dtype=torch.float64), t(sd, f"{p}.attn.v_bias")])
  q, k, v = (
    F.linear(h, t(sd, f"{p}.attn.mat_qkv.weight"), bias)
    .view(b, n, 3, heads, c // heads)
    .permute(2, 0, 3, 1, 4)
    .unbind(0)
  )
  mul = t(sd, f"{p}.attn.scale_mul_1H11").clamp_max(math.log(100)).exp()
  q, k = F.normalize(q, dim=-1) * mul, F.normalize(k, dim=-1)
  o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
  o = F.linear(o.transpose(1, 2).reshape(b, n, c), t(sd, f"{p}.attn.proj.weight"), t(sd, f"{p}.attn.proj.bias"))
  x = x + o * g1
  h = F.layer_norm(x, (c,), eps=1e-6) * (s2 + 1) + sh2
  f = F.gelu(F.linear(h, t(sd, f"{p}.ffn.fc1.weight"), t(sd, f"{p}.ffn.fc1.bias")), approximate="tanh")
  return x + F.linear(f, t(sd, f"{p}.ffn.fc2.weight"), t(sd, f"{p}.ffn.fc2.bias")) * g2


def ref_head(sd, nm, head, x, cond):
  c = x.shape[-1]
  scale, shift = (
    F.linear(F.silu(cond), t(sd, f"{nm}.ada_lin.1.weight"), t(sd, f"{nm}.ada_lin.1.bias")).view(-1, 1, 2, c).unbind(2)
  )
  h = F.layer_norm(x, (c,), eps=1e-6) * (scale + 1) + shift
  return F.linear(h, t(sd, f"{head}.weight"), t(sd, f"{head}.bias"))


def ref_forward(sd, labels, embedded, block_prefixes, nm, head, heads):
  """embedded: (B, L - 1, C) word embeddings of scales >= 1; returns (B, L, V) float64 logits."""
  cond = t(sd, "class_emb.weight")[torch.as_tensor(np.asarray(labels))]
  sos = cond[:, None] + t(sd, "pos_start")
  x = torch.cat([sos, embedded], 1)
  x = x + t(sd, "lvl_embed.weight")[torch.as_tensor(np.asarray(sd["lvl_1L"][0]))][None] + t(sd, "pos_1LC")
  mask = t(sd, "attn_bias_for_masking")
  for p in block_prefixes:
    x = ref_block(sd, p, x, cond, heads, mask)
  return ref_head(sd, nm, head, x, cond).numpy()


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(3)
  labels = np.array([4, 10])
  teacher = rng.standard_normal((B, L - 1, 8)).astype(np.float32)
  contrib = rng.standard_normal((B, L - 1, 8)).astype(np.float32)
  mask = rng.random((B, L - 1)) < 0.5
  return labels, teacher, contrib, mask


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("pattern", ["block_causal", "block_diagonal"])
def test_var_format_converts_with_full_coverage_and_matches_reference(pattern, batch):
  """VAR checkpoints (block_causal) and HMAR next-scale training checkpoints (same keys,
  block_diagonal buffer) convert and give the official logits."""
  m = tiny("var", pattern)
  sd = fake_state_dict(expected_var_shapes(m), m)
  model = convert_var_state_dict(sd, m)
  labels, teacher, _, _ = batch
  got = nnx.jit(lambda mo, a, b: mo.nsp_logits(a, b))(model, jnp.asarray(labels), jnp.asarray(teacher))
  emb = F.linear(torch.from_numpy(teacher).double(), t(sd, "word_embed.weight"), t(sd, "word_embed.bias"))
  want = ref_forward(sd, labels, emb, [f"blocks.{i}" for i in range(3)], "head_nm", "head", 2)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)


def test_hmar_format_converts_and_both_branches_match_reference(batch):
  m = tiny("hmar")
  sd = fake_state_dict(expected_hmar_shapes(m), m, seed=1)
  model = convert_hmar_state_dict(sd, m)
  labels, teacher, contrib, mask = batch
  j_labels, j_teacher = jnp.asarray(labels), jnp.asarray(teacher)
  w, bias = t(sd, "word_embed.weight"), t(sd, "word_embed_bias")
  teacher_t, contrib_t = torch.from_numpy(teacher).double(), torch.from_numpy(contrib).double()

  # next-scale branch: base_blocks + ns_blocks + ns head
  got = nnx.jit(lambda mo, a, b: mo.nsp_logits(a, b))(model, j_labels, j_teacher)
  ns_blocks = ["base_blocks.0", "ns_blocks.0", "ns_blocks.1"]
  want = ref_forward(sd, labels, F.linear(teacher_t, w) + bias, ns_blocks, "ns_head_nm", "ns_head", 2)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)

  # masked branch (official get_word_embed): W f_prev + (W h, masked -> mask_embed) + b
  got = nnx.jit(lambda mo, *a: mo.mp_logits(*a))(model, j_labels, j_teacher, jnp.asarray(contrib), jnp.asarray(mask))
  masked = torch.where(torch.from_numpy(mask)[..., None], t(sd, "mask_embed.weight")[0], F.linear(contrib_t, w))
  emb = F.linear(teacher_t, w) + masked + bias
  mask_blocks = ["base_blocks.0", "mask_blocks.0", "mask_blocks.1"]
  want = ref_forward(sd, labels, emb, mask_blocks, "mask_head_nm", "mask_head", 2)
  np.testing.assert_allclose(np.asarray(got), want[:, 1:], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["var", "hmar"])
def test_missing_unexpected_and_misshaped_keys_are_named(kind):
  m = tiny(kind)
  shapes = expected_var_shapes(m) if kind == "var" else expected_hmar_shapes(m)
  convert = convert_var_state_dict if kind == "var" else convert_hmar_state_dict
  sd = fake_state_dict(shapes, m)
  some_block = "blocks.1" if kind == "var" else "ns_blocks.1"
  missing = f"{some_block}.ffn.fc2.bias"
  bad = "pos_1LC"
  del sd[missing]
  sd["blocks.9.attn.extra_thing"] = np.zeros(3, np.float32)
  sd[bad] = np.zeros((1, L + 1, 64), np.float32)
  with pytest.raises(ConversionError) as err:
    convert(sd, m)
  msg = str(err.value)
  assert "missing 1 key" in msg and missing in msg
  assert "unexpected 1 key" in msg and "blocks.9.attn.extra_thing" in msg
  assert f"{bad}: has shape (1, {L + 1}, 64), expected (1, {L}, 64)" in msg


def test_a_var_checkpoint_is_refused_by_an_hmar_next_scale_config():
  m = tiny("var")
  sd = fake_state_dict(expected_var_shapes(m), m)
  with pytest.raises(ConversionError, match="attn_bias_for_masking is not the 'block_diagonal' mask"):
    convert_var_state_dict(sd, tiny("var", "block_diagonal"))
  with pytest.raises(ConversionError, match="not an HMAR inference one"):
    convert_hmar_state_dict(sd, tiny("hmar"))


def test_an_hmar_inference_checkpoint_is_refused_by_the_var_converter():
  m = tiny("hmar")
  sd = fake_state_dict(expected_hmar_shapes(m), m)
  with pytest.raises(ConversionError, match="official HMAR inference checkpoint"):
    convert_var_state_dict(sd, tiny("var"))


def test_nonzero_k_bias_buffer_is_refused():
  m = tiny("var")
  sd = fake_state_dict(expected_var_shapes(m), m)
  sd["blocks.2.attn.zero_k_bias"] = np.ones(64, np.float32)
  with pytest.raises(ConversionError, match="blocks.2.attn.zero_k_bias is not all zero"):
    convert_var_state_dict(sd, m)


@pytest.mark.parametrize("kind", ["var", "hmar"])
def test_model_config_is_inferred_from_official_shapes(kind):
  for depth in (16, 30):
    m = model_config(depth, kind=kind)
    shapes = expected_var_shapes(m) if kind == "var" else expected_hmar_shapes(m)
    fake = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}  # no memory
    fake["attn_bias_for_masking"] = np.where(patterns.dense_mask(m.patch_nums, m.pattern), 0.0, -np.inf)[None, None]
    got = infer_model_config(fake, kind=kind)
    for field in (
      "depth",
      "width",
      "num_heads",
      "patch_nums",
      "vocab_size",
      "cvae",
      "num_classes",
      "mask_layers",
      "pattern",
      "attn_l2_norm",
    ):
      assert got[field] == m[field], (field, got[field], m[field])


def test_official_d16_key_table():
  """The official d16 key/shape tables (no tensors allocated): VAR var_d16.pth and HMAR hmar-d16.pth."""
  var = expected_var_shapes(model_config(16, kind="var"))
  assert var["blocks.15.attn.mat_qkv.weight"] == (3072, 1024)
  assert var["blocks.0.ada_lin.1.weight"] == (6144, 1024)
  assert var["blocks.3.attn.scale_mul_1H11"] == (1, 16, 1, 1)
  assert var["blocks.7.ffn.fc1.weight"] == (4096, 1024)
  assert var["class_emb.weight"] == (1001, 1024) and var["pos_start"] == (1, 1, 1024)
  assert var["pos_1LC"] == (1, 680, 1024) and var["lvl_embed.weight"] == (10, 1024)
  assert var["word_embed.weight"] == (1024, 32) and var["head.weight"] == (4096, 1024)
  assert var["attn_bias_for_masking"] == (1, 1, 680, 680) and var["lvl_1L"] == (1, 680)
  per_block = {k.split(".", 2)[2] for k in var if k.startswith("blocks.0.")}
  assert per_block == {
    "ada_lin.1.weight",
    "ada_lin.1.bias",
    "attn.mat_qkv.weight",
    "attn.q_bias",
    "attn.v_bias",
    "attn.zero_k_bias",
    "attn.scale_mul_1H11",
    "attn.proj.weight",
    "attn.proj.bias",
    "ffn.fc1.weight",
    "ffn.fc1.bias",
    "ffn.fc2.weight",
    "ffn.fc2.bias",
  }
  assert len(var) == 6 + 16 * 13 + 4 + 2
  buffers = [k for k in var if k.endswith("zero_k_bias") or k in ("lvl_1L", "attn_bias_for_masking")]
  params = sum(math.prod(s) for k, s in var.items() if k not in buffers)
  assert params == 310283520  # the shared anchors (official HMAR d16 train step figures), 256 px

  hmar = expected_hmar_shapes(model_config(16, kind="hmar"))
  assert {f"base_blocks.{i}" for i in range(8)} <= {".".join(k.split(".")[:2]) for k in hmar}
  assert {f"ns_blocks.{i}" for i in range(8)} <= {".".join(k.split(".")[:2]) for k in hmar}
  assert {f"mask_blocks.{i}" for i in range(8)} <= {".".join(k.split(".")[:2]) for k in hmar}
  assert not any(k.startswith("blocks.") for k in hmar)
  assert hmar["word_embed_bias"] == (1024,) and hmar["mask_embed.weight"] == (1, 1024)
  assert hmar["ns_head.weight"] == (4096, 1024) and hmar["mask_head_nm.ada_lin.1.weight"] == (2048, 1024)
  assert len(hmar) == len(var) + 8 * 13 + 4 + 1


def test_pth_file_converts_to_a_checkpoint_that_restores(tmp_path, batch):
  m = tiny("hmar")
  sd = fake_state_dict(expected_hmar_shapes(m), m, seed=2)
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, tmp_path / "hmar-tiny.pth")
  out = convert_hmar_file(tmp_path / "hmar-tiny.pth", tmp_path / "ckpt", m, log=lambda s: None)
  restored = checkpoint.restore_params(out, ScaleTransformer(m, rngs=nnx.Rngs(9)))
  direct = convert_hmar_state_dict(sd, m)
  chex.assert_trees_all_equal(nnx.state(restored, nnx.Param), nnx.state(direct, nnx.Param))
  with pytest.raises(FileExistsError):
    convert_hmar_file(tmp_path / "hmar-tiny.pth", tmp_path / "ckpt", m, log=lambda s: None)
