"""HiMARModel (hmar_jax/models/himar_model.py): the official two-stage training loss and the checkpoints.

The loss is compared with a re-statement of the official HiMAR.forward (stage-1 forward_loss with MAR's
DiffLoss, stage-2 global_forward_loss with GlobalDiffLoss) built from the PyTorch re-statements
(tests/torch_ref_himar.py backbone, tests/torch_ref_diffloss.py MLP head and float64 hybrid loss,
tests/torch_ref_dit_head.py DiT head on NCHW images and its masked MSE), weighted 0.4 / 0.6. The random
draws (both masks, the placeholder rows, both heads' timesteps and noise) are made explicit by
monkeypatching the draw functions HiMARModel.loss calls; the patched functions read arrays passed to
the compiled function, so one compilation serves every draw. torch's `.repeat(mul, ...)` tiles the
whole batch (row i * B + j is row j). Tolerance: rtol 1e-4 (float32 against float64).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_ref_diffloss import RefSchedule, randomized_torch_diffloss, ref_hybrid_loss  # noqa: E402
from torch_ref_dit_head import randomized_torch_head, ref_masked_mse, ref_q_sample  # noqa: E402

from hmar_jax import checkpoint  # noqa: E402
from hmar_jax.convert.himar import convert_himar_state_dict  # noqa: E402
from hmar_jax.models import himar, himar_model, mar  # noqa: E402
from hmar_jax.models.diffloss import DiffLoss  # noqa: E402
from hmar_jax.models.dit_head import DiTHead  # noqa: E402
from hmar_jax.models.himar_model import abstract_himar, himar_model_config, load_himar, save_himar  # noqa: E402
from hmar_jax.models.mar_model import abstract_mar, save_mar  # noqa: E402
from tests.torch_ref_himar import RefHiMAR  # noqa: E402

B = 2
MUL = 2  # diffusion_batch_mul: the heads see each row twice with independent noise
WARMUP = 10


def tiny(**changes):
  """The tiny Hi-MAR with diffusion_batch_mul 2 and every row keeping its pivots after WARMUP epochs."""
  c = himar.himar_config("tiny")
  c.update(diffusion_batch_mul=MUL, step_stage2_rate=1.0, step_warmup=WARMUP)
  c.update(changes)
  return c


@pytest.fixture(scope="module")
def torch_model():
  """(RefHiMAR, TorchDiffLoss, TorchGlobalHead) float64 with random weights, and the HiMARModel converted
  from them."""
  c = tiny()
  t, d = mar.token_embed_dim(c), c.decoder_embed_dim
  backbone = RefHiMAR(c).randomize(5).double().eval()
  head1 = randomized_torch_diffloss(t, d, c.diffloss_d, c.diffloss_w, seed=5)
  head2 = randomized_torch_head(
    5, c=t, cz=d, depth=c.gdm_d, width=c.gdm_w, heads=c.head, mlp_ratio=float(c.ratio), grid=mar.seq_hw(c)[0]
  )
  sd = {k: v.float().numpy() for k, v in backbone.state_dict().items()}
  sd.update({f"diffloss.{k}": v.detach().float().numpy() for k, v in head1.state_dict().items()})
  sd.update({f"cond_diffloss.{k}": v.detach().float().numpy() for k, v in head2.state_dict().items()})
  graphdef, _ = nnx.split(abstract_himar(c), nnx.Param)
  model = nnx.merge(graphdef, convert_himar_state_dict(sd, c))
  return backbone, head1.double().eval(), head2.double().eval(), model


def batch(seed):
  c = tiny()
  rng = np.random.default_rng(seed)
  # scaled KL-16 latents are of order 1; clipped to [-1, 1] as the diffusion's data range
  high = np.clip(0.5 * rng.standard_normal((B, himar.high_res_len(c), c.cond_dim)), -1, 1).astype(np.float32)
  low = np.clip(0.5 * rng.standard_normal((B, himar.low_res_len(c), c.cond_dim)), -1, 1).astype(np.float32)
  return high, low, rng.integers(0, c.class_num, B)


# ----------------------------------------------------------------------------- the loss against the official one

DRAWS = {}  # the explicit draws of the compiled call being traced


@nnx.jit
def loss_with_draws(model, high, low, labels, draws, epoch):
  DRAWS.update(draws)
  return model.loss(high, low, labels, jax.random.key(0), epoch=epoch, train=False)


@pytest.fixture
def explicit_draws(monkeypatch):
  """Replaces HiMARModel.loss's random draws by the arrays in DRAWS. The placeholder keeps the official
  rule (where stage 1 saw the token, or the whole row) with the row choice made explicit."""
  monkeypatch.setattr(himar_model, "stage1_training_mask", lambda key, b, c: DRAWS["mask1"])
  monkeypatch.setattr(himar_model, "stage2_training_mask", lambda key, b, c: DRAWS["mask2"])
  monkeypatch.setattr(
    himar_model, "pivot_placeholder", lambda key, mask1, epoch, c: DRAWS["drop_row"][:, None] | (mask1 == 0)
  )
  monkeypatch.setattr(DiffLoss, "draw_training_noise", lambda self, key, n: (DRAWS["t1"], DRAWS["noise1"]))
  monkeypatch.setattr(DiTHead, "draw_training_noise", lambda self, key, n: (DRAWS["t2"], DRAWS["noise2"]))


def make_draws(seed, masked1, masked2, drop_row):
  c = tiny()
  s, n, t = himar.low_res_len(c), himar.high_res_len(c), mar.token_embed_dim(c)
  rng = np.random.default_rng(seed)

  def mask(length, count):
    m = np.zeros((B, length), np.float32)
    for r in range(B):
      m[r, rng.permutation(length)[:count]] = 1.0
    return m

  return {
    "mask1": mask(s, masked1),
    "mask2": mask(n, masked2),
    "drop_row": np.asarray(drop_row),
    # t >= 1: the t = 0 decoder-likelihood term of a random network is often below float32's
    # resolution (tests/test_diffloss.py covers it)
    "t1": rng.integers(1, 1000, MUL * B * s).astype(np.int32),
    "noise1": rng.standard_normal((MUL * B * s, t)).astype(np.float32),
    "t2": rng.integers(0, 1000, MUL * B).astype(np.int32),
    "noise2": rng.standard_normal((MUL * B, n, t)).astype(np.float32),
  }


def official_losses(backbone, head1, head2, high, low, labels, d):
  """(loss1, loss2) of the official forward in evaluation mode (no dropout, no label drop), float64,
  with the official training placeholder rule and the given draws."""
  c = tiny()
  s, side, ch = himar.low_res_len(c), mar.seq_hw(c)[0], mar.token_embed_dim(c)
  f64 = lambda x: torch.from_numpy(np.array(x)).double()  # noqa: E731
  sched = RefSchedule()
  with torch.no_grad():
    z1 = backbone.stage1(f64(low), f64(high), f64(d["mask1"]), torch.from_numpy(labels).long())
    # official: small_cond_mask * ph + (1 - small_cond_mask) * (small_mask * ph + (1 - small_mask) * piv)
    row, small_mask = f64(d["drop_row"])[:, None], 1.0 - f64(d["mask1"])
    placeholder = 1.0 - (1.0 - row) * (1.0 - small_mask)
    z2 = backbone.stage2(
      f64(high), f64(d["mask2"]), torch.from_numpy(labels).long(), pivots=z1, placeholder=placeholder
    )

    # forward_loss: (B * S) rows repeated MUL times, masked mean of the hybrid loss
    target = f64(low).reshape(B * s, -1).repeat(MUL, 1).numpy()
    z = z1.reshape(B * s, -1).repeat(MUL, 1)
    mask = f64(d["mask1"]).reshape(B * s).repeat(MUL).numpy()
    t1, noise1 = d["t1"].astype(np.int64), d["noise1"].astype(np.float64)
    out = head1.net(torch.from_numpy(sched.q_sample(target, t1, noise1)), torch.from_numpy(t1), z).numpy()
    per_token = ref_hybrid_loss(sched, out, target, t1, noise1)["loss"]
    loss1 = float((per_token * mask).sum() / mask.sum())

    # global_forward_loss: NCHW images repeated MUL times, the masked MSE of the DiT's eps
    nchw = lambda x: x.reshape(x.shape[0], side, side, -1).permute(0, 3, 1, 2)  # noqa: E731
    img = nchw(f64(high)).repeat(MUL, 1, 1, 1).numpy()
    zz = nchw(z2).repeat(MUL, 1, 1, 1)
    mm = f64(d["mask2"]).reshape(B, side, side).repeat(MUL, 1, 1).numpy()
    t2 = d["t2"].astype(np.int64)
    noise2 = nchw(f64(d["noise2"])).numpy()
    assert noise2.shape == (MUL * B, ch, side, side)
    eps = head2.net(torch.from_numpy(ref_q_sample(sched, img, t2, noise2)), torch.from_numpy(t2), None, zz).numpy()
    loss2 = float(ref_masked_mse(eps, noise2, mm).mean())
  return loss1, loss2


@pytest.mark.parametrize(
  "seed, masked1, masked2, drop_row",
  [(0, 3, 5, [True, False]), (1, 4, 12, [False, False])],
  ids=["one-row-of-placeholders", "all-pivots"],
)
def test_the_loss_is_the_weighted_sum_of_the_official_stage_losses(
  torch_model, explicit_draws, seed, masked1, masked2, drop_row
):
  backbone, head1, head2, model = torch_model
  d = make_draws(seed, masked1, masked2, drop_row)
  high, low, labels = batch(seed)
  loss, metrics = loss_with_draws(model, high, low, labels, d, jnp.float32(3.0))
  want1, want2 = official_losses(backbone, head1, head2, high, low, labels, d)
  np.testing.assert_allclose(float(metrics["loss_stage1"]), want1, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["loss_stage2"]), want2, rtol=1e-4)
  w1, w2 = himar.STAGE_LOSS_WEIGHTS
  np.testing.assert_allclose(float(loss), w1 * want1 + w2 * want2, rtol=1e-4)
  assert float(metrics["mask_ratio_stage1"]) == pytest.approx(d["mask1"].mean())
  assert float(metrics["mask_ratio_stage2"]) == pytest.approx(d["mask2"].mean())


# ----------------------------------------------------------------------------- training


@nnx.jit
def stage_grads(model, high, low, labels, key, epoch, weights):
  """(metrics, gradients of weights[0] * loss_stage1 + weights[1] * loss_stage2) of one training batch
  (dropout, label drop, real draws); compiled once for the tests below, weights (2,) select a stage."""

  def objective(m):
    _, metrics = m.loss(high, low, labels, key, epoch=epoch)
    return weights[0] * metrics["loss_stage1"] + weights[1] * metrics["loss_stage2"], metrics

  (_, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(model)
  return metrics, grads


def grads_of_stage(model, stage, seed, epoch=WARMUP):
  """(metrics, {path: gradient of the stage's loss}) for batch / key `seed`."""
  high, low, labels = batch(seed)
  weights = jnp.asarray([1.0, 0.0] if stage == 1 else [0.0, 1.0])
  metrics, grads = stage_grads(model, high, low, labels, train_key(seed), jnp.float32(epoch), weights)
  return metrics, {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


def train_key(seed):
  # rbg keys compile much faster than threefry on CPU
  return jax.random.key(seed, impl="unsafe_rbg")


def test_training_gradients_are_finite_and_each_stage_reaches_its_head_and_the_backbone(torch_model):
  *_, model = torch_model
  metrics, g1 = grads_of_stage(model, 1, seed=2)
  _, g2 = grads_of_stage(model, 2, seed=2)
  assert np.isfinite(float(metrics["loss"]))
  assert all(np.all(np.isfinite(x)) for g in (g1, g2) for x in g.values())
  reaches = lambda g, path: bool(np.any(g[path] != 0))  # noqa: E731
  head1 = ("diffloss", "net", "final_layer", "linear", "kernel")
  head2 = ("cond_diffloss", "net", "final_layer", "linear", "kernel")
  assert reaches(g1, head1) and not reaches(g1, head2)
  assert reaches(g2, head2) and not reaches(g2, head1)
  assert reaches(g1, ("backbone", "decoder_embed", "kernel"))
  assert reaches(g2, ("backbone", "z_proj", "kernel")) and reaches(g2, ("backbone", "cond_z_proj", "kernel"))


def test_the_stage2_loss_sends_no_gradient_into_stage1_through_the_pivots(torch_model):
  """The pivots are detached (official small_z = z.clone().detach()): the task-0 rows of the task
  embeddings, used by stage 1 only, get no gradient from the stage-2 loss."""
  *_, model = torch_model
  _, g1 = grads_of_stage(model, 1, seed=4)
  _, g2 = grads_of_stage(model, 2, seed=4)
  for stack in ("encoder", "decoder"):
    path = ("backbone", f"{stack}_task_emb", "embedding")
    assert np.any(g1[path][0] != 0) and np.all(g2[path][0] == 0), stack
    assert np.any(g2[path][1] != 0), stack  # stage 2's own task row does learn


def test_the_pivots_reach_stage2_only_as_the_epoch_passes_the_warmup(torch_model):
  """At epoch 0 every row's pivots are placeholders (the stage-2 loss ignores cond_z_proj); at the end
  of the warmup with step_stage2_rate 1 no row is, and cond_z_proj changes the stage-2 loss."""
  *_, model = torch_model
  other = nnx.clone(model)
  kernel = other.backbone.cond_z_proj.kernel
  kernel.set_value(kernel.get_value() + 0.5)

  def stage2_loss(m, epoch):
    return float(grads_of_stage(m, 2, seed=6, epoch=epoch)[0]["loss_stage2"])

  assert stage2_loss(model, 0.0) == stage2_loss(other, 0.0)
  assert stage2_loss(model, WARMUP) != stage2_loss(other, WARMUP)


def test_bad_stage_loss_weights_are_refused_naming_the_field():
  with pytest.raises(ValueError, match="stage_loss_weights"):
    abstract_himar(tiny(stage_loss_weights=(0.4, -0.6)))


# ----------------------------------------------------------------------------- checkpoints


def params_of(model) -> dict:
  return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_save_and_load_keep_every_parameter_and_the_config(torch_model, tmp_path):
  *_, model = torch_model
  path = save_himar(tmp_path / "himar", model, tiny())
  loaded = load_himar(path)
  a, b = params_of(model), params_of(loaded)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  want = himar_model_config(tiny()).to_dict()
  assert loaded.config.to_dict() == want
  assert himar_model_config(checkpoint.load_metadata(path)["model"]).to_dict() == want


def test_loading_with_another_global_head_names_the_mismatched_keys(torch_model, tmp_path):
  *_, model = torch_model
  path = save_himar(tmp_path / "himar", model, tiny())
  with pytest.raises(checkpoint.CheckpointMismatchError, match="cond_diffloss"):
    load_himar(path, tiny(gdm_w=32))


def test_a_mar_checkpoint_is_refused_by_name(tmp_path):
  graphdef, state = nnx.split(abstract_mar(mar.mar_config("tiny")))
  model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
  path = save_mar(tmp_path / "mar", model, mar.mar_config("tiny"))
  with pytest.raises(ValueError, match="'hmar_jax.mar' checkpoint, not Hi-MAR parameters"):
    load_himar(path)


def test_a_missing_directory_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    load_himar(tmp_path / "no_such_dir")
