"""Hi-MAR image sampling (hmar_jax/sampling/himar_generate.py) and its command line (hmar_jax/sample.py).

The two-stage loop is compared with a NumPy re-statement of the official models/himar.py
`sample_tokens` (full-length masks over the S + L slots, mask_by_order / mask_by_order_step,
nonzero gathers, the official write-back of every masked token) driving the same backbone and
deterministic stand-in heads (the MLP head a tanh of z, the DiT head a tanh of z plus the mean of
its known tokens), so the schedules, the recorded pivots (small_z) and the known / keep masks are
checked exactly, independently of the diffusion noise.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from mar_sampling_helpers import tiny_kl_vae
from PIL import Image
from sampling_helpers import random_module

from hmar_jax import sample
from hmar_jax.models.himar import himar_config
from hmar_jax.models.himar_model import HiMARModel, save_himar
from hmar_jax.models.mar import sample_orders
from hmar_jax.sampling.himar_generate import HiMARSampler
from hmar_jax.tokenizer.kl_vae import abstract_kl_vae, kl_vae_config, save_kl_vae

LABELS = np.array([0, 3, 7], np.int32)
GUIDED = dict(num_iter=2, cfg=2.5, re_cfg=2.7, cfg_schedule="linear", temperature=1.0)


def tiny_himar_config():
  """himar_config('tiny') on the tiny KL VAE's latents: 16 px images, stride 4, 4 x 4 high-res tokens,
  2 x 2 low-res ones (8 stage-1 steps); 5 MLP-head and 4 DiT-head diffusion steps."""
  c = himar_config("tiny")
  c.img_size = 16
  c.vae_stride = 4
  c.num_sampling_steps = "5"
  c.gdm_num_sampling_steps = "4"
  return c


@pytest.fixture(scope="module")
def model():
  return random_module(lambda: HiMARModel(tiny_himar_config(), rngs=nnx.Rngs(0)), 1, scale=0.05)


@pytest.fixture(scope="module")
def vae():
  return tiny_kl_vae(0)


@pytest.fixture(scope="module")
def sampler(model, vae):
  return HiMARSampler(model, vae)


@pytest.fixture(scope="module")
def guided(sampler):
  """(tokens, images) of LABELS with seed 0 and the GUIDED options."""
  tokens = sampler.sample_tokens(LABELS, 0, **GUIDED)
  return np.asarray(tokens), np.asarray(sampler.decode(tokens))


# ----------------------------------------------------------------------------- stand-in heads


def _guide(out, cfg):
  """The heads' guidance rule on rows [cond; uncond]: both halves become uncond + cfg (cond - uncond),
  plus 0.1 cfg (on random weights cond and uncond hardly differ: the offset shows each step's scale)."""
  if isinstance(cfg, (int, float)) and cfg == 1.0:
    return out
  h = out.shape[0] // 2
  g = out[h:] + cfg * (out[:h] - out[h:]) + 0.1 * cfg
  return jnp.concatenate([g, g])


class MLPStandIn(nnx.Module):
  """DiffLoss.sample's interface: (N, Cz) -> (N, C) = temperature * tanh(z W), guided."""

  def __init__(self, cz, c, seed):
    self.w = nnx.Param(jnp.asarray(np.random.default_rng(seed).normal(size=(cz, c)) / math.sqrt(cz), jnp.float32))

  def sample(self, z, key, temperature=1.0, cfg=1.0):
    return _guide(temperature * jnp.tanh(z @ self.w[...]), cfg)


class DiTStandIn(nnx.Module):
  """DiTHead.sample's interface: (N, L, Cz) -> (N, L, C) = temperature * tanh(z W) + the mean of the
  known tokens (so every output depends on which tokens are known and what they are), guided."""

  def __init__(self, cz, c, seq_len, seed):
    self.w = nnx.Param(jnp.asarray(np.random.default_rng(seed).normal(size=(cz, c)) / math.sqrt(cz), jnp.float32))
    self.seq_len, self.in_channels = seq_len, c

  def sample(self, z, key, *, known=None, keep=None, temperature=1.0, cfg=1.0):
    k = keep[..., None].astype(jnp.float32)
    context = jnp.sum(known * k, axis=1, keepdims=True) / (1.0 + jnp.sum(k, axis=1, keepdims=True))
    return _guide(temperature * jnp.tanh(z @ self.w[...]) + context, cfg)


class StandInModel(nnx.Module):
  def __init__(self, backbone, c):
    d, t = int(c.decoder_embed_dim), int(c.vae_embed_dim)
    self.backbone = backbone
    self.diffloss = MLPStandIn(d, t, 11)
    self.cond_diffloss = DiTStandIn(d, t, backbone.high_len, 12)


def official_sample_tokens(model, labels, orders, *, num_iter, cfg, re_cfg, cfg_schedule, temperature):
  """The official HiMAR.sample_tokens in NumPy (orders (B, S + L): a permutation of the S low-res
  places, then one of the L high-res places offset by S). Returns (low-res tokens, small_z[:B], tokens)."""
  bb = model.backbone
  b, s, n = len(labels), bb.low_len, bb.high_len
  seq, buf, cond_scale = s + n, bb.buffer_size, int(bb.config.cond_scale)
  # Each stage's forward pass compiled whole (op-by-op execution would compile every op per shape).
  stage1 = nnx.jit(lambda bb, x, m, lab, drop: bb.stage1(x, m, lab, capacity=buf + s, drop_labels=drop))
  stage2 = nnx.jit(lambda bb, x, m, lab, drop, p: bb.stage2(x, m, lab, pivots=p, capacity=buf + seq, drop_labels=drop))
  labels = np.asarray(labels)
  mask = np.ones((b, seq))
  tokens = np.zeros((b, n, bb.token_embed_dim), np.float32)
  cond_tokens = np.zeros((b, s, bb.cond_dim), np.float32)
  small_z = np.zeros((2 * b, s, bb.config.decoder_embed_dim), np.float32)

  def rows(guided):
    drop = np.zeros(b, bool)
    return (np.concatenate([labels, labels]), np.concatenate([drop, ~drop])) if guided else (labels, drop)

  def scale(g, mask_len, total):
    return 1 + (g - 1) * (total - mask_len) / total if cfg_schedule == "linear" else g

  small_num_iter = cond_scale * 4
  for step in range(small_num_iter):
    cur_cond_tokens = cond_tokens.copy()
    lab, drop = rows(re_cfg != 1.0)
    if re_cfg != 1.0:
      cond_tokens, mask = np.concatenate([cond_tokens, cond_tokens]), np.concatenate([mask, mask])
    z = np.asarray(stage1(bb, jnp.asarray(cond_tokens), mask[:, :s] > 0, lab, drop))
    mask_len = np.floor(s * np.cos(math.pi / 2.0 * (step + 1) / small_num_iter))
    mask_len = int(max(1, min(mask[:, :s].sum(-1)[0] - 1, mask_len)))
    mask_next = np.zeros((b, seq))
    mask_next[np.arange(b)[:, None], orders[:, :mask_len]] = 1
    mask_next[:, s:] = 1
    if step >= small_num_iter - 1:
      to_pred = mask[:b].astype(bool)
      to_pred[:, s:] = False
    else:
      to_pred = mask[:b].astype(bool) ^ mask_next.astype(bool)
    if re_cfg != 1.0:
      to_pred = np.concatenate([to_pred, to_pred])
    where = to_pred[:, :s].nonzero()
    small_z[where] = z[where]
    mask = mask_next
    sampled = np.asarray(model.diffloss.sample(jnp.asarray(z[where]), None, temperature, scale(re_cfg, mask_len, s)))
    if re_cfg != 1.0:
      sampled, to_pred = sampled[: len(sampled) // 2], to_pred[:b]
    cur_cond_tokens[to_pred[:, :s].nonzero()] = sampled
    cond_tokens = cur_cond_tokens

  mask[:, :s] = 0
  small_z = np.concatenate([small_z[:b], small_z[:b]]) if cfg != 1.0 else small_z[:b]
  for step in range(num_iter):
    cur_tokens = tokens.copy()
    lab, drop = rows(cfg != 1.0)
    if cfg != 1.0:
      tokens, mask = np.concatenate([tokens, tokens]), np.concatenate([mask, mask])
    z = stage2(bb, jnp.asarray(tokens), mask[:, s:] > 0, lab, drop, jnp.asarray(small_z))
    mask_len = np.floor(n * np.cos(math.pi / 2.0 * (step + 1) / num_iter))
    mask_len = int(max(1, min(mask.sum(-1)[0] - 1, mask_len)))
    mask_next = np.zeros((b, seq))
    mask_next[np.arange(b)[:, None], orders[:, s:][:, :mask_len]] = 1
    last_mask = mask.astype(bool)
    out = model.cond_diffloss.sample(
      z,
      None,
      known=jnp.asarray(tokens),
      keep=jnp.asarray(~last_mask[:, s:]),
      temperature=temperature,
      cfg=scale(cfg, mask_len, n),
    )
    sampled = np.asarray(out)[last_mask[:, s:].nonzero()]
    if cfg != 1.0:
      sampled, last_mask = sampled[: len(sampled) // 2], last_mask[:b]
    cur_tokens[last_mask[:, s:].nonzero()] = sampled
    tokens, mask = cur_tokens, mask_next
  return cond_tokens, small_z[:b], tokens


# ----------------------------------------------------------------------------- the sampler


def test_images_are_nhwc_in_the_unit_range_at_the_vae_resolution(guided):
  _, images = guided
  assert images.shape == (len(LABELS), 16, 16, 3) and images.dtype == np.float32
  assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
  assert images.std() > 0


def test_the_same_seed_gives_the_same_images_and_another_seed_other_ones(sampler, guided):
  tokens, images = guided
  np.testing.assert_array_equal(np.asarray(sampler.sample(LABELS, 0, **GUIDED)), images)
  other = np.asarray(sampler.sample_tokens(LABELS, 1, **GUIDED))
  assert not np.allclose(other, tokens)
  assert not np.allclose(np.asarray(sampler.decode(other)), images)


@pytest.mark.parametrize(
  "options",
  [
    GUIDED,
    dict(num_iter=3, cfg=1.0, re_cfg=1.0, cfg_schedule="linear", temperature=0.9),
    dict(num_iter=2, cfg=3.0, re_cfg=1.0, cfg_schedule="constant", temperature=1.2),
  ],
  ids=["both-guided", "unguided", "stage2-guided-constant"],
)
def test_both_stages_are_the_official_loop_with_stand_in_heads(model, vae, options):
  stand_in = StandInModel(model.backbone, tiny_himar_config())
  s, n = model.backbone.low_len, model.backbone.high_len
  k1, k2 = jax.random.split(jax.random.key(3))
  orders = (np.asarray(sample_orders(k1, len(LABELS), s)), np.asarray(sample_orders(k2, len(LABELS), n)))
  got = HiMARSampler(stand_in, vae).sample_stages(LABELS, 0, orders=orders, **options)
  low, pivots, tokens = official_sample_tokens(
    stand_in, LABELS, np.concatenate([orders[0], orders[1] + s], axis=1), **options
  )
  np.testing.assert_allclose(np.asarray(got["low_res_tokens"]), low, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(got["pivots"]), pivots, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(got["tokens"]), tokens, rtol=1e-4, atol=1e-4)


def test_another_cfg_re_cfg_temperature_or_seed_compiles_nothing_new(sampler, guided):
  before = sampler.compiled_counts()
  assert min(before) >= 1
  images = sampler.sample(LABELS, 5, num_iter=2, cfg=2.0, re_cfg=3.5, cfg_schedule="constant", temperature=0.8)
  assert sampler.compiled_counts() == before
  assert not np.allclose(np.asarray(images), guided[1])


@pytest.mark.parametrize(
  "labels, options, message",
  [
    (LABELS, dict(num_iter=0), "num_iter must be an integer >= 1"),
    (LABELS, dict(cfg=0.5), "cfg must be a number >= 1 for Hi-MAR"),
    (LABELS, dict(re_cfg=0.9), "re_cfg must be a number >= 1 for Hi-MAR"),
    (LABELS, dict(re_cfg=float("inf")), "re_cfg must be a number >= 1"),
    (LABELS, dict(cfg_schedule="cosine"), "cfg_schedule must be one of linear, constant"),
    (LABELS, dict(temperature=0.0), "temperature must be > 0"),
    (np.array([0, 10]), {}, r"class ids \[10\] outside \[0, 10\)"),
    (np.zeros((2, 2), np.int32), {}, "labels must be a non-empty"),
  ],
)
def test_bad_options_and_labels_are_refused_before_anything_compiles(model, vae, labels, options, message):
  fresh = HiMARSampler(model, vae)
  with pytest.raises(ValueError, match=message):
    fresh.sample(labels, 0, **options)
  assert fresh.compiled_counts() == (0, 0, 0, 0, 0)


def test_a_vae_of_other_latents_than_the_models_is_refused(model):
  config = kl_vae_config("tiny")
  config.embed_dim = 8
  with pytest.raises(ValueError, match="does not match the Hi-MAR model"):
    HiMARSampler(model, abstract_kl_vae(config))


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def checkpoints(model, vae, tmp_path_factory):
  root = tmp_path_factory.mktemp("himar_ckpt")
  params, tokenizer = str(root / "params"), str(root / "vae")
  save_himar(params, model, tiny_himar_config())
  save_kl_vae(tokenizer, vae)
  return params, tokenizer


def run_cli(*args):
  """python -m hmar_jax.sample ARGS, in process, with its own flags."""
  values = flags.FlagValues()
  sample.define_flags(values)
  values(["prog", *args])
  sample.run(values)


def test_the_command_line_writes_the_grid_write_himar_sample_grid_writes(
  model, vae, checkpoints, tmp_path, monkeypatch
):
  params, tokenizer = checkpoints
  calls = []
  original = HiMARSampler.sample
  monkeypatch.setattr(HiMARSampler, "sample", lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
  run_cli(
    f"--params={params}",
    f"--tokenizer={tokenizer}",
    "--classes=2",
    "--per_class=3",
    "--cfg=2.0",
    "--re_cfg=3.0",
    "--temperature=0.9",
    "--seed=4",
    f"--out={tmp_path}/cli.png",
  )
  direct = sample.write_himar_sample_grid(
    model, vae, str(tmp_path / "direct.png"), classes=[2], per_class=3, cfg=2.0, re_cfg=3.0, temperature=0.9, seed=4
  )
  cli_grid, direct_grid = np.asarray(Image.open(tmp_path / "cli.png")), np.asarray(Image.open(direct))
  assert cli_grid.ndim == 3 and cli_grid.shape[0] < cli_grid.shape[1]  # one row of 3 images
  np.testing.assert_array_equal(cli_grid, direct_grid)
  # --num_iter not given: Hi-MAR's default (4), not MAR's.
  assert calls[0] == dict(num_iter=4, cfg=2.0, re_cfg=3.0, cfg_schedule="linear", temperature=0.9)


def test_sampling_at_scale_hands_a_placed_himar_sampler_and_its_options_to_sample_to_dir(
  checkpoints, tmp_path, monkeypatch
):
  # The drawing itself is stubbed (sample_to_dir is covered on its own): this checks the wiring.
  params, tokenizer = checkpoints
  seen = []

  def fake_sample(self, labels, key, **kwargs):
    seen.append((self, kwargs))
    return jnp.broadcast_to(jnp.asarray(labels, jnp.float32)[:, None, None, None] / 10.0, (len(labels), 16, 16, 3))

  monkeypatch.setattr(HiMARSampler, "sample", fake_sample)
  out = tmp_path / "at_scale"
  args = [f"--params={params}", f"--tokenizer={tokenizer}", "--classes=1,3", "--per_class=2", "--batch_size=4"]
  run_cli(*args, "--cfg=2.0", "--re_cfg=3.0", "--seed=2", f"--out_dir={out}")
  assert isinstance(seen[0][0], HiMARSampler)
  assert seen[0][1] == dict(num_iter=4, cfg=2.0, re_cfg=3.0, cfg_schedule="linear", temperature=1.0)
  with np.load(out / "samples_4x16x16x3.npz") as f:
    np.testing.assert_array_equal(f["labels"], [1, 1, 3, 3])
  with open(out / "sampling_run.json") as f:
    assert json.load(f)["sampling"]["re_cfg"] == "3.0"
  with pytest.raises(ValueError, match="other settings"):  # another re_cfg would mix two runs in one folder
    run_cli(*args, "--cfg=2.0", "--re_cfg=2.0", "--seed=2", f"--out_dir={out}")


def test_hmar_options_are_refused_for_a_himar_checkpoint_before_loading_it(checkpoints, tmp_path, monkeypatch):
  params, tokenizer = checkpoints
  from hmar_jax.models import himar_model

  monkeypatch.setattr(himar_model, "load_himar", lambda *a, **k: pytest.fail("the checkpoint was loaded"))
  with pytest.raises(ValueError, match=r"--top_k, --kv_cache: HMAR / VAR options, but .* holds a Hi-MAR model"):
    run_cli(f"--params={params}", f"--tokenizer={tokenizer}", "--top_k=5", "--kv_cache", f"--out={tmp_path}/x.png")


def test_a_bad_re_cfg_is_refused_naming_the_flag_before_loading(checkpoints, tmp_path, monkeypatch):
  params, tokenizer = checkpoints
  from hmar_jax.models import himar_model

  monkeypatch.setattr(himar_model, "load_himar", lambda *a, **k: pytest.fail("the checkpoint was loaded"))
  with pytest.raises(ValueError, match=r"--re_cfg must be a number >= 1 for Hi-MAR"):
    run_cli(f"--params={params}", f"--tokenizer={tokenizer}", "--re_cfg=0.5", f"--out={tmp_path}/x.png")


def test_re_cfg_is_refused_for_a_checkpoint_that_is_not_himar(tmp_path):
  with pytest.raises(ValueError, match=r"--re_cfg: a Hi-MAR option, but /no/such/params holds no Hi-MAR parameters"):
    run_cli("--params=/no/such/params", "--tokenizer=/no/such/vae", "--re_cfg=2.0", f"--out={tmp_path}/x.png")
