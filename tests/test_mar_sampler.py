"""MAR's masked generation loop (hmar_jax/sampling/mar_sampler.py).

The loop is compared with a PyTorch re-statement of the official `sample_tokens` (models/mar.py),
run with the same generation orders and the same stand-in backbone (a deterministic function of
the visible tokens, the mask and the class embedding) and stand-in head (deterministic, guidance
applied to [conditional; unconditional] halves as the official DiffLoss.sample's rows are laid out).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hmar_jax.models import mar
from hmar_jax.sampling.mar_sampler import backbone_sample_fn, bucket, cfg_scale, mar_schedule, sample_tokens

B, L, C, CZ, K = 2, 16, 3, 6, 5
G = torch.Generator().manual_seed(0)
POS = torch.randn(L, CZ, generator=G, dtype=torch.float64)
POSW = torch.randn(L, generator=G, dtype=torch.float64)
MIX = torch.randn(C, CZ, generator=G, dtype=torch.float64)
CLASS_EMB = torch.randn(K, CZ, generator=G, dtype=torch.float64)
FAKE = torch.randn(CZ, generator=G, dtype=torch.float64)


def standin_backbone(tokens, mask, cls):
  """z (N, L, CZ): each place sees the class embedding and a weighted sum of the visible tokens."""
  seen = (tokens * (1 - mask)[..., None] * POSW[None, :, None]).sum(1)
  return torch.tanh(POS[None] + cls[:, None] + (seen @ MIX)[:, None] * 0.3)


def standin_head(z, temperature, cfg):
  out = z[:, :C] * temperature
  if cfg != 1.0:
    cond, uncond = out.chunk(2)
    out = torch.cat([uncond + cfg * (cond - uncond)] * 2)
  return out


def jax_backbone_fn(calls=None):
  def fn(tokens, mask, labels, drop, num_visible):
    mask_np = np.array(mask)
    assert (L - mask_np.sum(1)).max() <= num_visible, "num_visible must bound the visible tokens"
    if calls is not None:
      calls.append((np.asarray(tokens), mask_np, np.asarray(drop)))
    cls = torch.where(torch.from_numpy(np.array(drop))[:, None], FAKE, CLASS_EMB[torch.from_numpy(np.array(labels))])
    z = standin_backbone(torch.from_numpy(np.array(tokens)).double(), torch.from_numpy(mask_np).double(), cls)
    return jnp.asarray(z.numpy(), jnp.float32)

  return fn


def jax_head_fn(z, key, temperature, cfg):
  return jnp.asarray(standin_head(torch.from_numpy(np.array(z)).double(), temperature, cfg).numpy(), jnp.float32)


def official_sample_tokens(orders, labels, num_iter, cfg, cfg_schedule, temperature, record=None):
  """The official loop (models/mar.py sample_tokens) with the stand-ins, in PyTorch float64."""
  bsz = orders.shape[0]
  mask = torch.ones(bsz, L, dtype=torch.float64)
  tokens = torch.zeros(bsz, L, C, dtype=torch.float64)
  for step in range(num_iter):
    cur_tokens = tokens.clone()
    class_embedding = CLASS_EMB[labels] if labels is not None else FAKE.repeat(bsz, 1)
    if cfg != 1.0:
      tokens = torch.cat([tokens, tokens], dim=0)
      class_embedding = torch.cat([class_embedding, FAKE.repeat(bsz, 1)], dim=0)
      mask = torch.cat([mask, mask], dim=0)
    z = standin_backbone(tokens, mask, class_embedding)
    mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
    mask_len = torch.Tensor([np.floor(L * mask_ratio)])
    mask_len = torch.maximum(torch.Tensor([1]), torch.minimum(torch.sum(mask, dim=-1, keepdims=True) - 1, mask_len))
    mask_next = torch.zeros(bsz, L).scatter(-1, orders[:, : mask_len[0].long()], torch.ones(bsz, L)).bool()
    mask_to_pred = mask[:bsz].bool() if step >= num_iter - 1 else torch.logical_xor(mask[:bsz].bool(), mask_next.bool())
    mask = mask_next.double()
    if record is not None:
      record.append((int(mask_len[0, 0]), int(mask_to_pred.sum(1)[0])))
    if cfg != 1.0:
      mask_to_pred = torch.cat([mask_to_pred, mask_to_pred], dim=0)
    z = z[mask_to_pred.nonzero(as_tuple=True)]
    cfg_iter = 1 + (cfg - 1) * (L - mask_len[0]) / L if cfg_schedule == "linear" else cfg
    sampled = standin_head(z, temperature, float(cfg_iter))
    if cfg != 1.0:
      sampled, _ = sampled.chunk(2, dim=0)
      mask_to_pred, _ = mask_to_pred.chunk(2, dim=0)
    cur_tokens[mask_to_pred.nonzero(as_tuple=True)] = sampled
    tokens = cur_tokens.clone()
  return tokens


def orders_of(seed, bsz=B):
  return np.asarray(mar.sample_orders(jax.random.key(seed), bsz, L))


@pytest.mark.parametrize("num_iter, seq_len", [(64, 256), (16, 256), (256, 256), (7, 16), (20, 16), (1, 16)])
def test_the_host_schedule_is_the_official_loops_mask_len_sequence(num_iter, seq_len):
  masked, record = torch.ones(1, seq_len), []
  for step in range(num_iter):  # the official mask_len arithmetic on the official tensors
    mask_len = torch.Tensor([np.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter))])
    mask_len = torch.maximum(torch.Tensor([1]), torch.minimum(masked.sum(-1, keepdims=True) - 1, mask_len))
    n_pred = int(masked.sum()) if step == num_iter - 1 else int(masked.sum() - mask_len[0, 0])
    record.append((int(mask_len[0, 0]), n_pred))
    masked = torch.ones(1, int(mask_len[0, 0]))
  steps = mar_schedule(num_iter, seq_len)
  assert [(s.mask_len, s.num_pred) for s in steps] == record
  assert sum(s.num_pred for s in steps) == seq_len


@pytest.mark.parametrize(
  "cfg, cfg_schedule, labels", [(1.0, "linear", [1, 3]), (3.0, "linear", [4, 0]), (2.0, "constant", None)]
)
def test_tokens_equal_the_official_loops_with_the_same_orders(cfg, cfg_schedule, labels):
  orders = orders_of(1)
  want = official_sample_tokens(
    torch.tensor(orders).long(), None if labels is None else torch.tensor(labels), 7, cfg, cfg_schedule, 0.9
  )
  got = sample_tokens(
    jax_backbone_fn(),
    jax_head_fn,
    None if labels is None else jnp.asarray(labels),
    jax.random.key(0),
    num_iter=7,
    cfg=cfg,
    cfg_schedule=cfg_schedule,
    temperature=0.9,
    seq_len=L,
    token_dim=C,
    batch=B,
    orders=jnp.asarray(orders),
  )
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5, rtol=1e-5)


def test_every_token_is_predicted_once_and_never_changes_afterwards():
  calls = []
  steps = mar_schedule(9, L)
  tokens = sample_tokens(
    jax_backbone_fn(calls),
    lambda z, key, t, cfg: jax.random.normal(key, (z.shape[0], C)),
    jnp.array([0, 2]),
    jax.random.key(5),
    num_iter=9,
    cfg=1.0,
    cfg_schedule="linear",
    temperature=1.0,
    seq_len=L,
    token_dim=C,
  )
  masks = [m for _, m, _ in calls] + [np.zeros((B, L), bool)]
  inputs = [t for t, _, _ in calls] + [np.asarray(tokens)]
  assert masks[0].all()
  for i in range(len(calls)):
    revealed = masks[i] & ~masks[i + 1]
    assert not (masks[i + 1] & ~masks[i]).any(), "a revealed token was masked again"
    np.testing.assert_array_equal(revealed.sum(1), steps[i].num_pred)
    shown = ~masks[i]  # tokens visible at step i stay as they were
    np.testing.assert_array_equal(inputs[i + 1][shown], inputs[i][shown])


def test_a_fixed_key_gives_the_same_tokens_and_another_key_other_tokens():
  def run(seed):
    return sample_tokens(
      jax_backbone_fn(),
      lambda z, key, t, cfg: z[:, :C] + t * jax.random.normal(key, (z.shape[0], C)),
      jnp.array([1, 1]),
      jax.random.key(seed),
      num_iter=5,
      cfg=2.0,
      cfg_schedule="linear",
      temperature=1.0,
      seq_len=L,
      token_dim=C,
    )

  a, b, c = run(3), run(3), run(4)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_kept_tokens_equal_the_given_ones_and_are_visible_from_the_first_step():
  rng = np.random.default_rng(0)
  known = rng.standard_normal((B, L, C)).astype(np.float32)
  keep = np.zeros((B, L), bool)
  keep[0, :5] = True
  keep[1, 3:12] = True
  calls = []
  tokens = np.asarray(
    sample_tokens(
      jax_backbone_fn(calls),
      lambda z, key, t, cfg: jax.random.normal(key, (z.shape[0], C)) + 100.0,
      jnp.array([0, 1]),
      jax.random.key(2),
      num_iter=6,
      cfg=1.0,
      cfg_schedule="linear",
      temperature=1.0,
      seq_len=L,
      token_dim=C,
      known=jnp.asarray(known),
      keep=jnp.asarray(keep),
    )
  )
  np.testing.assert_array_equal(tokens[keep], known[keep])
  assert (tokens[~keep] > 50).all(), "every free token is sampled"
  for t, m, _ in calls:
    assert not m[keep].any()
    np.testing.assert_array_equal(t[keep], known[keep])


def test_the_cfg_halves_give_the_unconditional_rows_the_fake_latent():
  calls = []
  sample_tokens(
    jax_backbone_fn(calls),
    jax_head_fn,
    jnp.array([2, 3]),
    jax.random.key(0),
    num_iter=3,
    cfg=4.0,
    cfg_schedule="constant",
    temperature=1.0,
    seq_len=L,
    token_dim=C,
  )
  for _, _, drop in calls:
    np.testing.assert_array_equal(drop, [False, False, True, True])


def test_linear_cfg_grows_with_the_revealed_share():
  assert cfg_scale(3.0, "linear", 12, 16) == pytest.approx(1 + 2.0 * 4 / 16)
  assert cfg_scale(3.0, "constant", 12, 16) == 3.0
  with pytest.raises(ValueError, match="cfg_schedule must be one of"):
    cfg_scale(3.0, "cosine", 12, 16)


def test_buckets_are_powers_of_two_capped_at_the_length():
  assert [bucket(n, 20) for n in (0, 1, 2, 3, 5, 9, 17, 20)] == [0, 1, 2, 4, 8, 16, 20, 20]


def test_the_backbone_fn_with_a_bucketed_capacity_equals_the_backbone_at_full_capacity():
  config = mar.mar_config("tiny")
  backbone = mar.MARBackbone(config, rngs=nnx.Rngs(0))
  n, t = mar.seq_len(config), mar.token_embed_dim(config)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.standard_normal((4, n, t)), jnp.float32)
  mask = jnp.asarray(mar.mask_by_order(11, mar.sample_orders(jax.random.key(0), 4, n)))  # 5 visible
  labels, drop = jnp.array([1, 7, 7, 2]), jnp.array([False, False, True, True])
  fn = backbone_sample_fn(backbone)
  full = fn(tokens, mask, labels, drop, n)  # capacity buffer + L: every place fits
  got = fn(tokens, mask, labels, drop, bucket(5, n))
  np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-5, rtol=1e-5)
