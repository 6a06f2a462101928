"""MARModel (hmar_jax/models/mar_model.py): the official training loss and the checkpoint round trip.

The loss is compared with a re-statement of the official MAR.forward + forward_loss + DiffLoss.forward
built from the PyTorch re-statements (tests/torch_ref_mar.py backbone, tests/torch_ref_diffloss.py
network and float64 hybrid loss), with the random draws (orders, mask ratio, timesteps, noise) made
explicit by monkeypatching the draw functions MARModel.loss calls. The official forward_loss repeats
the (B * L) rows with torch's `.repeat(mul, 1)`, which tiles the whole batch (row i * B * L + j is
row j), and averages the per-token loss over the masked rows. Tolerance: rtol 1e-4 (float32 against
float64, as tests/test_diffloss.py).
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
from torch_ref_mar import RefMAR  # noqa: E402

from hmar_jax import checkpoint  # noqa: E402
from hmar_jax.convert.mar import convert_mar_state_dict  # noqa: E402
from hmar_jax.models import mar, mar_model  # noqa: E402
from hmar_jax.models.diffloss import DiffLoss  # noqa: E402
from hmar_jax.models.mar_model import abstract_mar, load_mar, save_mar  # noqa: E402
from hmar_jax.tokenizer.config import vqvae_config  # noqa: E402
from hmar_jax.tokenizer.vqvae import VQVAE, save_vqvae  # noqa: E402

B = 2


def tiny(**changes):
  c = mar.mar_config("tiny")
  c.update(changes)
  return c


@pytest.fixture(scope="module")
def torch_model():
  """(RefMAR, TorchDiffLoss) float64 with random weights, and the MARModel converted from them."""
  c = tiny()
  backbone = RefMAR(c).randomize(4).double().eval()
  head = randomized_torch_diffloss(mar.token_embed_dim(c), c.decoder_embed_dim, c.diffloss_d, c.diffloss_w, seed=4)
  sd = {k: v.float().numpy() for k, v in backbone.state_dict().items()}
  sd.update({f"diffloss.{k}": v.detach().numpy() for k, v in head.state_dict().items()})
  graphdef, _ = nnx.split(abstract_mar(c), nnx.Param)
  model = nnx.merge(graphdef, convert_mar_state_dict(sd, c))
  return backbone, head.double().eval(), model


def batch(seed):
  c = tiny()
  rng = np.random.default_rng(seed)
  # scaled KL-16 latents are of order 1; clipped to [-1, 1] as the diffusion's data range
  tokens = np.clip(0.5 * rng.standard_normal((B, mar.seq_len(c), mar.token_embed_dim(c))), -1, 1).astype(np.float32)
  labels = rng.integers(0, c.class_num, B)
  return tokens, labels


def explicit_draws(monkeypatch, seed, ratio):
  """Replaces the random draws of MARModel.loss by fixed arrays; returns them."""
  c = tiny()
  n, rows = mar.seq_len(c), B * mar.seq_len(c) * c.diffusion_batch_mul
  rng = np.random.default_rng(seed)
  draws = {
    "orders": np.stack([rng.permutation(n) for _ in range(B)]).astype(np.int32),
    # t >= 1: the t = 0 decoder-likelihood term of a random network is often below float32's
    # resolution (tests/test_diffloss.py and tests/test_diffusion.py cover it)
    "t": rng.integers(1, 1000, rows).astype(np.int32),
    "noise": rng.standard_normal((rows, mar.token_embed_dim(c))).astype(np.float32),
    "ratio": ratio,
  }
  monkeypatch.setattr(mar_model, "sample_orders", lambda key, b, n: jnp.asarray(draws["orders"]))
  monkeypatch.setattr(mar_model, "mask_ratio", lambda key, lo: jnp.float32(draws["ratio"]))
  monkeypatch.setattr(
    DiffLoss, "draw_training_noise", lambda self, key, n: (jnp.asarray(draws["t"]), jnp.asarray(draws["noise"]))
  )
  return draws


def official_loss(backbone, head, tokens, labels, draws, mul):
  """The official forward + forward_loss (evaluation mode: no dropout, no label drop), float64."""
  n = tokens.shape[1]
  num_masked = int(np.ceil(n * draws["ratio"]))
  mask = torch.zeros(B, n, dtype=torch.float64)
  mask = torch.scatter(mask, -1, torch.from_numpy(draws["orders"][:, :num_masked]).long(), torch.ones(B, n).double())
  x = torch.from_numpy(tokens).double()
  with torch.no_grad():
    z = backbone(x, mask, torch.from_numpy(labels).long())
    target = x.reshape(B * n, -1).repeat(mul, 1)
    z = z.reshape(B * n, -1).repeat(mul, 1)
    mask = mask.reshape(B * n).repeat(mul)
    t = draws["t"].astype(np.int64)
    sched = RefSchedule()
    x_t = sched.q_sample(target.numpy(), t, draws["noise"].astype(np.float64))
    out = head.net(torch.from_numpy(x_t), torch.from_numpy(t), z).numpy()
  per_token = ref_hybrid_loss(sched, out, target.numpy(), t, draws["noise"].astype(np.float64))["loss"]
  return float((per_token * mask.numpy()).sum() / mask.numpy().sum())


@pytest.mark.parametrize("ratio", [0.75, 0.9])
def test_the_loss_is_the_official_masked_mean_over_the_batch_tiled_diffusion_batch_mul_times(
  torch_model, monkeypatch, ratio
):
  backbone, head, model = torch_model
  draws = explicit_draws(monkeypatch, seed=int(ratio * 100), ratio=ratio)
  tokens, labels = batch(0)
  loss, metrics = model.loss(jnp.asarray(tokens), jnp.asarray(labels), jax.random.key(0), train=False)
  want = official_loss(backbone, head, tokens, labels, draws, tiny().diffusion_batch_mul)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  assert float(metrics["mask_ratio"]) == np.ceil(mar.seq_len(tiny()) * ratio) / mar.seq_len(tiny())


@nnx.jit
def loss_and_grads(model, tokens, labels, key):
  """(loss, metrics, grads) of one training batch (dropout and label drop on); compiled once for
  the tests below. rbg keys compile much faster than threefry on CPU."""
  (loss, metrics), grads = nnx.value_and_grad(lambda m: m.loss(tokens, labels, key), has_aux=True)(model)
  return loss, metrics, grads


def train_key(seed):
  return jax.random.key(seed, impl="unsafe_rbg")


def test_the_mask_ratio_of_every_batch_is_within_mask_ratio_min_and_one(torch_model):
  _, _, model = torch_model
  c = tiny()
  tokens, labels = batch(1)
  ratios = [float(loss_and_grads(model, tokens, labels, train_key(s))[1]["mask_ratio"]) for s in range(32)]
  n = mar.seq_len(c)
  lowest = np.ceil(n * c.mask_ratio_min) / n
  assert all(lowest <= r <= 1.0 for r in ratios), ratios
  assert len(set(ratios)) > 1  # drawn per batch, not fixed


def test_training_gradients_are_finite_and_reach_backbone_and_head(torch_model):
  _, _, model = torch_model
  tokens, labels = batch(2)
  loss, _, grads = loss_and_grads(model, tokens, labels, train_key(3))
  assert np.isfinite(float(loss))
  leaves = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
  assert all(np.all(np.isfinite(x)) for x in leaves.values())
  assert np.any(leaves[("backbone", "z_proj", "kernel")] != 0)
  assert np.any(leaves[("diffloss", "net", "final_layer", "linear", "kernel")] != 0)


# ----------------------------------------------------------------------------- checkpoints


def params_of(model) -> dict:
  return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_save_and_load_keep_every_parameter_and_the_config(torch_model, tmp_path):
  _, _, model = torch_model
  path = save_mar(tmp_path / "mar", model, tiny())
  loaded = load_mar(path)
  a, b = params_of(model), params_of(loaded)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert checkpoint.load_metadata(path)["model"] == tiny().to_dict()


def test_loading_with_another_architecture_names_the_mismatched_keys(torch_model, tmp_path):
  _, _, model = torch_model
  path = save_mar(tmp_path / "mar", model, tiny())
  with pytest.raises(checkpoint.CheckpointMismatchError, match="diffloss"):
    load_mar(path, tiny(diffloss_w=32))


def test_a_vqvae_checkpoint_is_refused_by_name(tmp_path):
  vae = nnx.eval_shape(lambda: VQVAE(vqvae_config("tiny"), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(vae)
  vae = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
  path = save_vqvae(tmp_path / "vq", vae)
  with pytest.raises(ValueError, match="'hmar_jax.vqvae' checkpoint, not MAR parameters"):
    load_mar(path)


def test_a_missing_directory_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    load_mar(tmp_path / "no_such_dir")
