"""Classifier-free guidance of the sampler, against the official rule computed in NumPy.

Official VAR / HMAR (HMAR.generate, VAR.autoregressive_infer_cfg) run each scale on the class
batch and the null-class batch and sample from

  (1 + t) * cond_logits - t * uncond_logits,   t = cfg * si / (S - 1)

(t = 0 at the first scale, cfg at the last). The masked refinement steps use the constant
guidance `mask_cfg` (a documented deviation: the official code hard-codes t = cfg * 1e-6 there).

A stub model whose logits are lookup tables indexed by label and token position makes both
branches known exactly, so the expected logits and greedy tokens are computed here in float64
(with a stub tokenizer: the tables ignore the scale inputs, so only shapes matter there). One
test runs a random tiny HMAR and its real tokenizer.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax import config_utils
from hmar_jax.models.config import tiny_model_config
from hmar_jax.models.transformer import ScaleTransformer
from hmar_jax.sampling import Sampler
from hmar_jax.sampling import sampler as sampler_module
from hmar_jax.tokenizer.vqvae import VQVAE

PATCH_NUMS = (1, 2, 3, 4)  # of the table model
VOCAB, CVAE, NUM_CLASSES = 64, 8, 10
NULL = NUM_CLASSES  # the unconditional class id
LABELS = np.array([0, 3, 7, 9], np.int32)
SCHEDULE = [[1], [1, 3], [1, 2, 6], [16]]  # scales 1 and 2 refined in masked steps
BOUNDS = np.concatenate([[0], np.cumsum([p * p for p in PATCH_NUMS])])  # scale si: BOUNDS[si]:BOUNDS[si + 1]


class TableModel(nnx.Module):
  """Stands in for a ScaleTransformer: logits looked up by (label, token position).

  nsp (num_classes + 1, L, V): next-scale logits; mp (num_classes + 1, L, V): masked-step logits.
  The scale inputs are ignored, so each scale's logits are known whatever was sampled before.
  """

  patch_nums = PATCH_NUMS
  num_classes = NUM_CLASSES
  vocab_size = VOCAB
  cvae = CVAE
  mask_layers = 1
  pattern = "block_diagonal"

  def __init__(self, nsp: np.ndarray, mp: np.ndarray):
    self.nsp = nnx.Variable(jnp.asarray(nsp, jnp.float32))
    self.mp = nnx.Variable(jnp.asarray(mp, jnp.float32))

  def nsp_scale_logits(self, si, labels, scale_input=None):
    """(B, pn**2, V) rows of the nsp table for `labels` at scale si."""
    return self.nsp[...][labels, BOUNDS[si] : BOUNDS[si + 1]]

  def mp_scale_logits(self, si, labels, teacher_input, mask_input, mask):
    """(B, pn**2, V) rows of the mp table for `labels` at scale si."""
    return self.mp[...][labels, BOUNDS[si] : BOUNDS[si + 1]]


class _ZeroQuantizer(nnx.Module):
  """The quantizer interface the sampler uses, with all-zero scale inputs (B, pn**2, Cvae)."""

  patch_nums = PATCH_NUMS
  vocab_size = VOCAB
  z_channels = CVAE
  side = PATCH_NUMS[-1]

  def update_fhat(self, si, f_hat, idx):
    """(f_hat unchanged (B, side, side, Cvae), zero input of the next scale (B, pn_{si+1}**2, Cvae))."""
    pn = PATCH_NUMS[min(si + 1, len(PATCH_NUMS) - 1)]
    return f_hat, jnp.zeros((f_hat.shape[0], pn * pn, CVAE), f_hat.dtype)

  def mask_step_inputs(self, si, f_hat, tokens):
    """(teacher input, scale contribution), both zeros (B, pn**2, Cvae)."""
    zeros = jnp.zeros((f_hat.shape[0], PATCH_NUMS[si] ** 2, CVAE), f_hat.dtype)
    return zeros, zeros


class ZeroTokenizer(nnx.Module):
  """Stands in for a VQVAE in `Sampler.sample_indices` (which uses only its quantizer)."""

  def __init__(self):
    self.quantizer = _ZeroQuantizer()


def _random(ctor, seed, scale):
  """A module with N(0, scale^2) weights, built abstractly and filled from NumPy (no eager init)."""
  graphdef, state = nnx.split(nnx.eval_shape(ctor))
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), state))


@pytest.fixture(scope="module")
def vqvae():
  config = config_utils.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "vqvae.py:tiny"))
  return _random(lambda: VQVAE(config, rngs=nnx.Rngs(0)), 0, scale=0.1)


@pytest.fixture(scope="module")
def tables():
  """(nsp, mp) float64 tables (NUM_CLASSES + 1, L, V)."""
  rng = np.random.default_rng(0)
  shape = (NUM_CLASSES + 1, BOUNDS[-1], VOCAB)
  return rng.standard_normal(shape), rng.standard_normal(shape)


def _guided(table, labels, si, t):
  """float64 (B, pn**2, V): (1 + t) * table[label] - t * table[null] at scale si."""
  rows = slice(BOUNDS[si], BOUNDS[si + 1])
  return (1.0 + t) * table[labels, rows] - t * table[NULL, rows][None]


def _official_t(cfg, si):
  return cfg * si / (len(PATCH_NUMS) - 1)


@pytest.fixture(scope="module")
def table_sampler(tables):
  """(sampler of a TableModel, []): one for the file, so its compiled steps are reused."""
  return Sampler(TableModel(*tables), ZeroTokenizer()), []


@pytest.fixture(scope="module")
def recording_sampler(tables):
  """(sampler of a TableModel, log): the sampler appends to `log` every logits array it draws
  tokens from, in call order, and draws the argmax (the filters are not under test here; a host
  callback keeps a step out of the persistent compilation cache, so the step is kept small)."""
  log = []

  def record_and_take_argmax(key, logits, top_k, top_p):
    jax.debug.callback(lambda x: log.append(np.asarray(x, np.float64)), logits)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.ones(logits.shape[:-1], jnp.float32)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sampler_module, "sample_tokens", record_and_take_argmax)
    yield Sampler(TableModel(*tables), ZeroTokenizer()), log


def _sample(sampler_and_log, nsp, mp, labels, **kwargs):
  """(token maps [(B, pn**2)] per scale, [float64 logits (B, pn**2, V)] drawn from, in order)."""
  sampler, log = sampler_and_log
  sampler.update_model(TableModel(nsp, mp))
  log.clear()
  maps, _ = sampler.sample_indices(labels, 0, **kwargs)
  jax.block_until_ready(maps)
  jax.effects_barrier()
  return [np.asarray(m).reshape(len(labels), -1) for m in maps], list(log)


def test_next_scale_logits_are_guided_with_t_ramping_from_zero_to_cfg(tables, recording_sampler):
  nsp, mp = tables
  cfg = 2.5
  _, logits = _sample(recording_sampler, nsp, mp, LABELS, cfg=cfg, top_k=0, top_p=0.0)
  assert len(logits) == len(PATCH_NUMS)
  for si, got in enumerate(logits):
    np.testing.assert_allclose(got, _guided(nsp, LABELS, si, _official_t(cfg, si)), rtol=1e-5, atol=1e-5)


def test_greedy_tokens_are_the_argmax_of_the_officially_guided_logits(tables, table_sampler):
  nsp, mp = tables
  cfg = 2.5
  maps, _ = _sample(table_sampler, nsp, mp, LABELS, cfg=cfg, top_k=1, top_p=0.0)
  for si, got in enumerate(maps):
    want = _guided(nsp, LABELS, si, _official_t(cfg, si)).argmax(-1)
    np.testing.assert_array_equal(got, want, err_msg=f"scale {si}")
  # The tables tell the ramp apart from nearby rules: each would pick other tokens somewhere.
  num_scales = len(PATCH_NUMS)
  for other in (lambda si: cfg, lambda si: cfg * si / num_scales, lambda si: cfg * (si + 1) / num_scales):
    assert any(not np.array_equal(_guided(nsp, LABELS, si, other(si)).argmax(-1), m) for si, m in enumerate(maps))


@pytest.mark.parametrize("mask_cfg", [0.0, 1.5])
def test_masked_steps_are_guided_by_the_constant_mask_cfg(tables, recording_sampler, mask_cfg):
  nsp, mp = tables
  cfg = 2.5
  _, logits = _sample(
    recording_sampler, nsp, mp, LABELS, cfg=cfg, top_k=0, top_p=0.0, mask_schedule=SCHEDULE, mask_cfg=mask_cfg
  )
  # Draw order: nsp 0, nsp 1, mask 1, nsp 2, mask 2 (step 1), mask 2 (step 2), nsp 3.
  kinds = [(0, None), (1, None), (1, mask_cfg), (2, None), (2, mask_cfg), (2, mask_cfg), (3, None)]
  assert len(logits) == len(kinds)
  for (si, t_mask), got in zip(kinds, logits):
    want = _guided(nsp, LABELS, si, _official_t(cfg, si)) if t_mask is None else _guided(mp, LABELS, si, t_mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"scale {si}, mask step: {t_mask is not None}")


def test_masked_tokens_are_the_argmax_of_the_guided_masked_logits(tables, table_sampler):
  nsp, mp = tables
  nsp, mp, label = nsp.copy(), mp.copy(), 3
  labels = np.full(4, label, np.int32)
  # Per position: the class's masked logits rank tokens best, second, third. The null class
  # favours `best` by 10, so guided masked logits (1 + 2) * cond - 2 * uncond = cond - 20 at best
  # pick `second`; unguided ones pick `best`. The next-scale step picks `third` (forced high).
  order = np.argsort(-mp[label], axis=-1)
  best, second, third = order[:, 0], order[:, 1], order[:, 2]
  positions = np.arange(BOUNDS[-1])
  mp[NULL] = mp[label]
  mp[NULL, positions, best] += 10.0
  nsp[label, positions, third] = 100.0
  kw = dict(cfg=0.0, top_k=1, top_p=0.0, mask_schedule=SCHEDULE)
  plain, _ = _sample(table_sampler, nsp, mp, labels, mask_cfg=0.0, **kw)
  guided, _ = _sample(table_sampler, nsp, mp, labels, mask_cfg=2.0, **kw)
  for maps, masked_choice in ((plain, best), (guided, second)):
    for si, entry in enumerate(SCHEDULE):
      rows = slice(BOUNDS[si], BOUNDS[si + 1])
      tokens = maps[si]
      from_mask = tokens == masked_choice[rows]
      # The schedule's masked steps decide sum(entry[1:]) tokens, the next-scale step the rest.
      assert (from_mask.sum(-1) == sum(entry[1:])).all(), (si, entry)
      assert (tokens[~from_mask] == np.broadcast_to(third[rows], tokens.shape)[~from_mask]).all(), si


def test_mask_cfg_changes_the_refined_tokens_of_a_random_hmar(vqvae):
  model = _random(lambda: ScaleTransformer(tiny_model_config("hmar"), rngs=nnx.Rngs(0)), 1, scale=0.3)
  sampler = Sampler(model, vqvae)
  # configs/vqvae.py:tiny's scales (1, 2, 3, 5, 8); only the 2x2 scale is refined.
  kw = dict(cfg=1.5, top_k=0, top_p=0.0, mask_schedule=[[1], [1, 3], [9], [25], [64]])
  plain = sampler.sample_indices(LABELS, 0, mask_cfg=0.0, **kw)[0]
  guided = sampler.sample_indices(LABELS, 0, mask_cfg=3.0, **kw)[0]
  # Same seed and next-scale guidance: scale 0 (never refined) is the same; scale 1's masked
  # steps see the null class only when mask_cfg > 0.
  np.testing.assert_array_equal(plain[0], guided[0])
  assert not np.array_equal(plain[1], guided[1])
