"""Specification of the VAR / HMAR ScaleTransformer (hmar_jax/models) on tiny models."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax.models import ScaleTransformer, count_params, is_mask_branch_path, model_config

PATCH_NUMS = (1, 2, 3, 4)
L = sum(p * p for p in PATCH_NUMS)  # 30
B = 2


def tiny(kind, **overrides):
  m = model_config(
    3,
    kind=kind,
    patch_nums=PATCH_NUMS,
    width=64,
    num_heads=2,
    vocab_size=64,
    cvae=8,
    num_classes=10,
    mask_layers=2 if kind == "hmar" else 0,
  )
  m.attn_implementation = "xla"
  for k, v in overrides.items():
    m[k] = v
  return m


def random_model(m, seed=0, scale=0.3):
  """A model with random weights everywhere (the official init zeroes the adaLN biases and makes
  the gates tiny, which would hide cross-scale leakage). Built abstractly and filled from NumPy:
  eager initialisation compiles every op once, which costs seconds on a loaded CPU."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: ScaleTransformer(m, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def hmar():
  return random_model(tiny("hmar"), seed=0)


@pytest.fixture(scope="module")
def var():
  return random_model(tiny("var"), seed=1)


@pytest.fixture(scope="module")
def inputs():
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  labels = jnp.array([3, 10])  # 10 = the null class
  teacher = jax.random.normal(k1, (B, L - 1, 8))
  contrib = jax.random.normal(k2, (B, L - 1, 8))
  mask = jax.random.bernoulli(k3, 0.5, (B, L - 1))
  return labels, teacher, contrib, mask


@nnx.jit
def nsp(model, labels, teacher):
  return model.nsp_logits(labels, teacher)


def scale_changes(model, labels, teacher, j):
  """Per scale: max |logit change| when the input tokens of scale j are perturbed."""
  bounds = model.bounds
  base = nsp(model, labels, teacher)
  if j == 0:  # scale 0's input token is the start token: class embedding + pos_start
    old = model.pos_start[...]
    # a random vector: a constant shift would vanish in the first LayerNorm
    model.pos_start[...] = old + jax.random.normal(jax.random.key(11), old.shape)
    new = nsp(model, labels, teacher)
    model.pos_start[...] = old
  else:
    noise = jax.random.normal(jax.random.key(j), teacher.shape)
    new = nsp(
      model, labels, teacher.at[:, bounds[j] - 1 : bounds[j + 1] - 1].add(noise[:, bounds[j] - 1 : bounds[j + 1] - 1])
    )
  diff = np.abs(np.asarray(new - base))
  return [float(diff[:, bounds[k] : bounds[k + 1]].max()) for k in range(len(PATCH_NUMS))]


def test_hmar_markov_property_perturbing_scale_j_changes_only_scale_j(hmar, inputs):
  labels, teacher, _, _ = inputs
  for j in range(len(PATCH_NUMS)):
    changes = scale_changes(hmar, labels, teacher, j)
    for k, change in enumerate(changes):
      if k == j:
        assert change > 1e-2, (j, changes)
      else:
        assert change == 0.0, (j, changes)


def test_var_perturbing_scale_j_changes_scales_from_j_on(var, inputs):
  labels, teacher, _, _ = inputs
  for j in range(len(PATCH_NUMS)):
    changes = scale_changes(var, labels, teacher, j)
    for k, change in enumerate(changes):
      if k >= j:
        assert change > 1e-2, (j, changes)
      else:
        assert change == 0.0, (j, changes)


def test_hmar_scale_step_equals_slice_of_full_forward(hmar, inputs):
  labels, teacher, _, _ = inputs
  full = nsp(hmar, labels, teacher)
  for si in range(len(PATCH_NUMS)):
    b, e = hmar.bounds[si], hmar.bounds[si + 1]
    step = nnx.jit(lambda m, lab, x, si=si: m.nsp_scale_logits(si, lab, x))(
      hmar, labels, None if si == 0 else teacher[:, b - 1 : e - 1]
    )
    chex.assert_shape(step, (B, PATCH_NUMS[si] ** 2, 64))
    np.testing.assert_allclose(step, full[:, b:e], atol=2e-5, rtol=1e-5)


def test_var_kv_cache_steps_equal_slices_of_full_forward(var, inputs):
  labels, teacher, _, _ = inputs
  full = nsp(var, labels, teacher)
  cache = var.init_cache(B)
  for si in range(len(PATCH_NUMS)):
    b, e = var.bounds[si], var.bounds[si + 1]
    step, cache = nnx.jit(lambda m, lab, x, c, si=si: m.nsp_scale_logits_cached(si, lab, x, c))(
      var, labels, None if si == 0 else teacher[:, b - 1 : e - 1], cache
    )
    np.testing.assert_allclose(step, full[:, b:e], atol=2e-5, rtol=1e-5)


@nnx.jit
def mp(model, labels, teacher, contrib, mask):
  return model.mp_logits(labels, teacher, contrib, mask)


def test_mp_scale_step_equals_slice_of_full_masked_forward(hmar, inputs):
  labels, teacher, contrib, mask = inputs
  full = mp(hmar, labels, teacher, contrib, mask)
  chex.assert_shape(full, (B, L - 1, 64))
  for si in range(1, len(PATCH_NUMS)):
    s, e = hmar.bounds[si] - 1, hmar.bounds[si + 1] - 1
    step = nnx.jit(lambda m, *a, si=si: m.mp_scale_logits(si, *a))(
      hmar, labels, teacher[:, s:e], contrib[:, s:e], mask[:, s:e]
    )
    np.testing.assert_allclose(step, full[:, s:e], atol=2e-5, rtol=1e-5)


def test_mp_masked_tokens_hide_their_content_and_unmasked_do_not(hmar, inputs):
  labels, teacher, contrib, mask = inputs
  base = mp(hmar, labels, teacher, contrib, mask)
  hidden = mp(hmar, labels, teacher, jnp.where(mask[..., None], contrib + 5.0, contrib), mask)
  np.testing.assert_array_equal(hidden, base)
  shown = mp(hmar, labels, teacher, jnp.where(mask[..., None], contrib, contrib + 5.0), mask)
  assert float(jnp.abs(shown - base).max()) > 1e-2


def test_mp_uses_base_blocks_and_mask_branch_not_next_scale_blocks(hmar, inputs):
  """Masked prediction runs blocks[:depth - N] then mask_blocks; the next-scale blocks
  blocks[depth - N:] and head do not enter it."""
  labels, teacher, contrib, mask = inputs
  model = nnx.clone(hmar)
  base = mp(model, labels, teacher, contrib, mask)
  model.blocks[2].ffn.fc1.kernel[...] += 1.0  # depth 3, N = 2: blocks[1:] are next-scale only
  model.head.kernel[...] += 1.0
  np.testing.assert_array_equal(mp(model, labels, teacher, contrib, mask), base)
  model.blocks[0].ffn.fc1.kernel[...] += 1.0  # a shared base block
  assert float(jnp.abs(mp(model, labels, teacher, contrib, mask) - base).max()) > 1e-3


def test_init_mask_branch_copies_next_scale_blocks_and_head(inputs):
  model = random_model(tiny("hmar"), seed=5)
  model.init_mask_branch_from_next_scale()
  for j in range(2):
    chex.assert_trees_all_equal(nnx.state(model.mask_blocks[j], nnx.Param), nnx.state(model.blocks[1 + j], nnx.Param))
  chex.assert_trees_all_equal(nnx.state(model.mask_head, nnx.Param), nnx.state(model.head, nnx.Param))
  # With nothing masked and a zero teacher input, masked prediction = next-scale prediction of
  # the same tokens (the embeddings add up to W x + b either way).
  labels, _, contrib, _ = inputs
  none = jnp.zeros((B, L - 1), bool)
  np.testing.assert_allclose(
    mp(model, labels, jnp.zeros_like(contrib), contrib, none), nsp(model, labels, contrib)[:, 1:], atol=2e-5, rtol=1e-5
  )


def test_training_mode_class_dropout_and_drop_path(inputs):
  labels, teacher, _, _ = inputs
  m = tiny("var", depth=1, cond_drop_rate=0.999999, drop_path_rate=0.0)
  model = random_model(m)
  train = nnx.jit(lambda mo, lab, x, key: mo.nsp_logits(lab, x, train=True, key=key))
  dropped = train(model, labels, teacher, jax.random.key(0))
  null = nsp(model, jnp.full_like(labels, 10), teacher)
  np.testing.assert_allclose(dropped, null, atol=1e-5)  # every label became the null class
  model2 = random_model(tiny("var", depth=2, cond_drop_rate=0.0, drop_path_rate=0.5))  # dpr (0, 0.5)
  a = train(model2, labels, teacher, jax.random.key(1))
  np.testing.assert_array_equal(a, train(model2, labels, teacher, jax.random.key(1)))
  assert float(jnp.abs(a - nsp(model2, labels, teacher)).max()) > 1e-3
  with pytest.raises(ValueError, match="PRNG"):
    model2.nsp_logits(labels, teacher, train=True)


def test_each_block_of_the_list_layout_keeps_its_official_drop_path_rate():
  m = tiny("hmar", depth=3, drop_path_rate=0.4)
  m.scan_layers = False
  model = nnx.eval_shape(lambda: ScaleTransformer(m, rngs=nnx.Rngs(0)))
  rates = np.linspace(0.0, 0.4, 3)  # official dpr = linspace(0, drop_path_rate, depth)
  np.testing.assert_allclose([b.drop_path for b in model.blocks], rates)
  np.testing.assert_allclose([b.drop_path for b in model.mask_blocks], rates[1:])  # the last mask_layers blocks


def test_bfloat16_compute_keeps_float32_params_and_float32_logits(hmar, inputs):
  labels, teacher, _, _ = inputs
  m = tiny("hmar", dtype="bfloat16")
  model = random_model(m)
  nnx.update(model, nnx.state(hmar, nnx.Param))
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32
  out = nsp(model, labels, teacher)
  assert out.dtype == jnp.float32
  ref = nsp(hmar, labels, teacher)
  err = float(jnp.abs(out - ref).max()) / float(jnp.abs(ref).max())
  assert 0 < err < 5e-2


def test_official_initialisation_statistics():
  m = tiny("hmar")
  model = ScaleTransformer(m, rngs=nnx.Rngs(0))
  c, depth = 64, 3
  std = math.sqrt(1 / c / 3)

  def close(x, want):
    assert abs(float(jnp.std(x)) - want) < 0.1 * want, (float(jnp.std(x)), want)

  blk = model.blocks[1]
  close(blk.attn.qkv[...], std)
  close(blk.ffn.fc1.kernel[...], std)
  close(blk.attn.proj.kernel[...], std / math.sqrt(2 * depth))
  close(blk.ffn.fc2.kernel[...], std / math.sqrt(2 * depth))
  ada = blk.ada_lin.kernel[...]
  close(ada[:, 2 * c :], std * m.init_adaln)
  close(ada[:, : 2 * c], std * m.init_adaln_gamma)
  close(model.head.kernel[...], std * 0.02)
  close(model.head_nm.ada_lin.kernel[...], std * 0.5)
  close(model.class_emb.embedding[...], std)
  close(model.pos_1LC[...], std)
  np.testing.assert_allclose(blk.attn.scale_mul[...], np.log(4.0), rtol=1e-6)
  for b in (blk.ada_lin.bias, blk.attn.q_bias, blk.attn.v_bias, model.head.bias, model.word_embed.bias):
    assert not np.any(np.asarray(b[...]))


def test_every_parameter_has_logical_axis_names(hmar):
  allowed = {"embed", "mlp", "heads", "adaln", "vocab", "classes", "levels", "length", "cvae", None}
  for path, var in nnx.to_flat_state(nnx.state(hmar, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var[...].ndim, (path, axes)
    assert set(axes) <= allowed, (path, axes)


def test_d16_parameter_count_matches_official_next_scale_model():
  abstract = nnx.eval_shape(lambda: ScaleTransformer(model_config(16), rngs=nnx.Rngs(0)))
  # From the shared anchors (official HMAR d16 train step figures): the next-scale model at 256 px.
  assert count_params(abstract, exclude_mask_branch=True) == 310283520
  block = 18888720  # one d16 block: ada_lin 6.3M + qkv 3.1M + proj 1.05M + ffn 8.4M + biases
  head = 2 * 1024 * 1024 + 2048 + 1024 * 4096 + 4096
  assert count_params(abstract) == 310283520 + 8 * block + head + 1024


@pytest.mark.parametrize(
  "depth,patch_nums,official",
  [
    (24, None, 1033399360),  # d24, 256 px
    (16, (1, 2, 3, 4, 6, 9, 13, 18, 24, 32), 311880960),
  ],
)  # d16, 512 px
def test_other_parameter_counts_match_official(depth, patch_nums, official):
  m = model_config(depth) if patch_nums is None else model_config(depth, patch_nums=patch_nums)
  abstract = nnx.eval_shape(lambda: ScaleTransformer(m, rngs=nnx.Rngs(0)))
  assert count_params(abstract, exclude_mask_branch=True) == official  # same anchor file


def test_mask_branch_paths():
  assert is_mask_branch_path(("mask_blocks", 0, "ffn")) and is_mask_branch_path(("mask_embed",))
  assert not is_mask_branch_path(("blocks", 7)) and not is_mask_branch_path(("head", "kernel"))


def test_bad_inputs_raise_clear_errors_before_compiling(hmar, inputs):
  labels, teacher, contrib, mask = inputs
  with pytest.raises(ValueError, match="teacher_inputs must be"):
    hmar.nsp_logits(labels, teacher[:, :-1])
  with pytest.raises(ValueError, match="labels must be"):
    hmar.nsp_logits(labels[:, None], teacher)
  with pytest.raises(ValueError, match="mask must be"):
    hmar.mp_logits(labels, teacher, contrib, mask[:, :-1])
  with pytest.raises(ValueError, match="scale index"):
    hmar.nsp_scale_logits(7, labels, None)
  with pytest.raises(ValueError, match="block_diagonal"):
    ScaleTransformer(tiny("var", mask_layers=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_heads"):
    ScaleTransformer(tiny("var", num_heads=3), rngs=nnx.Rngs(0))


def test_float32_output_matmul_has_plain_gradients_in_float32():
  from hmar_jax.models.blocks import matmul_f32_out

  rng = np.random.default_rng(0)
  x, w, g = rng.normal(size=(3, 5, 8)), rng.normal(size=(8, 4)), rng.normal(size=(3, 5, 4))
  out, vjp = jax.vjp(matmul_f32_out, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  dx, dw = vjp(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(out, x @ w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, g @ w.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, np.einsum("bnk,bnm->km", x, g), rtol=1e-5, atol=1e-5)


def _dot_generals(jaxpr):
  """Every dot_general in a jaxpr, including those inside custom-vjp calls and other sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn)
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        found += _dot_generals(inner)
  return found


def test_bf16_matmul_keeps_float32_outputs_and_runs_its_backward_in_bf16():
  from hmar_jax.models.blocks import matmul_f32_out

  x, w = jnp.ones((2, 3, 8), jnp.bfloat16), jnp.ones((8, 4), jnp.bfloat16)
  assert matmul_f32_out(x, w).dtype == jnp.float32

  def grads(x, w):
    out, vjp = jax.vjp(matmul_f32_out, x, w)
    return vjp(jnp.ones_like(out))

  dots = _dot_generals(jax.make_jaxpr(grads)(x, w).jaxpr)
  assert len(dots) == 3  # the forward product, then d/dx and d/dw
  assert all(v.aval.dtype == jnp.bfloat16 for eqn in dots[1:] for v in eqn.invars)


def test_level_embeddings_are_the_table_rows_of_each_positions_scale_with_a_scatter_free_gradient(hmar):
  table = np.asarray(hmar.lvl_embed.embedding[...], np.float64)
  pos = np.asarray(hmar.pos_1LC[...], np.float64)[0]
  levels = np.concatenate([np.full(p * p, i) for i, p in enumerate(hmar.patch_nums)])
  got = np.asarray(hmar._lvl_pos(0, hmar.seq_len), np.float64)[0]
  np.testing.assert_allclose(got, table[levels] + pos, rtol=0, atol=1e-6)
  start, end = hmar.bounds[2], hmar.bounds[4]  # a window of two scales
  np.testing.assert_allclose(
    np.asarray(hmar._lvl_pos(start, end), np.float64)[0], (table[levels] + pos)[start:end], rtol=0, atol=1e-6
  )

  # A scatter-add accumulates in a device-dependent order on GPUs: data-parallel replicas drift.
  graphdef, state = nnx.split(hmar)

  def loss(state):
    model = nnx.merge(graphdef, state)
    return jnp.sum(model._lvl_pos(0, model.seq_len) ** 2)

  assert "scatter" not in str(jax.make_jaxpr(jax.grad(loss))(state))


@pytest.mark.parametrize("budget", [1 << 30, 3 * 2 * 2 * 11 * 4])  # one chunk; 3 query rows a chunk (7 = 3 + 3 + 1)
def test_prefix_attention_in_query_chunks_is_softmax_attention(budget):
  from hmar_jax.models.blocks import prefix_attention

  rng = np.random.default_rng(0)
  q, k, v = rng.normal(size=(2, 7, 2, 4)), rng.normal(size=(2, 2, 11, 4)), rng.normal(size=(2, 2, 11, 4))
  logits = np.einsum("blhd,bhmd->bhlm", q, k) * 0.5
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bhlm,bhmd->blhd", probs / probs.sum(-1, keepdims=True), v)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  got = prefix_attention(f32(q), f32(k), f32(v), 0.5, max_logits_bytes=budget)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
