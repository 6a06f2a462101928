"""Optimiser recipe: lr scaling and schedule, weight-decay exclusions, frozen parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hmar_jax.training import optim


def _official_lr(cur_it, wp_it, max_it, peak, sche="lin0", wp0=0.005, wpe=0.01):
  """float64 transcription of the official rule (utils/lr_control.lr_wd_annealing), for reference."""
  if cur_it < wp_it:
    return peak * (wp0 + (1 - wp0) * cur_it / wp_it)
  pasd = (cur_it - wp_it) / (max_it - 1 - wp_it)
  t = {"lin0": 0.05, "lin00": 0.0}[sche]
  if pasd < t:
    return peak
  return peak * (wpe + (1 - wpe) * (1 - pasd) / (1 - t))


@pytest.mark.parametrize("kind", ["lin0", "lin00"])
def test_schedule_warms_up_then_decays_like_the_official_rule(kind):
  sched = optim.lr_schedule(3e-4, total_steps=200, warmup_steps=20, kind=kind, wp0=0.005, wpe=0.1)
  got = np.array([float(sched(i)) for i in range(200)])
  want = np.array([_official_lr(i, 20, 200, 3e-4, kind, wpe=0.1) for i in range(200)])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got.argmax() >= 20 and got[-1] == pytest.approx(3e-5, rel=1e-5)


def test_peak_lr_scales_with_batch():
  assert optim.peak_learning_rate(1e-4, 768) == pytest.approx(3e-4)


def _params():
  return {
    "pos_1LC": jnp.ones((1, 5, 4)),
    "lvl_embed": {"embedding": jnp.ones((3, 4))},
    "class_emb": {"embedding": jnp.ones((11, 4))},
    "blocks": {
      "0": {
        "attn": {
          "scale_mul_1H11": jnp.ones((1, 2, 1, 1)),
          "q_bias": jnp.ones((4,)),
          "proj": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))},
        }
      },
      "1": {"mlp": {"kernel": jnp.ones((4, 4))}},
    },
    "head": {"kernel": jnp.ones((4, 6))},
  }


def test_weight_decay_skips_biases_1d_positions_levels_and_attention_scale():
  names = optim.param_names(_params())
  mask = optim.weight_decay_mask(_params())
  decayed = {n for n, m in zip(jax.tree.leaves(names), jax.tree.leaves(mask)) if m}
  assert decayed == {"blocks/0/attn/proj/kernel", "blocks/1/mlp/kernel", "head/kernel", "class_emb/embedding"}


def test_decoupled_weight_decay_matches_torch_adamw():
  torch = pytest.importorskip("torch")
  w0 = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  grads = [np.random.default_rng(i + 1).normal(size=(3, 4)).astype(np.float32) for i in range(3)]
  tx = optim.make_optimizer(learning_rate=1e-2, weight_decay=0.05, grad_clip=0)
  params = {"w": {"kernel": jnp.asarray(w0)}}
  state = tx.init(params)
  for g in grads:
    upd, state = tx.update({"w": {"kernel": jnp.asarray(g)}}, state, params)
    params = optax.apply_updates(params, upd)
  p = torch.nn.Parameter(torch.tensor(w0))
  opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
  for g in grads:
    p.grad = torch.tensor(g)
    opt.step()
  np.testing.assert_allclose(np.asarray(params["w"]["kernel"]), p.detach().numpy(), atol=1e-6)


def test_frozen_params_get_no_update_and_clipping_ignores_them():
  params = _params()
  tx = optim.make_optimizer(learning_rate=1.0, grad_clip=2.0, trainable=lambda n: n.startswith("head"))
  state = tx.init(params)
  grads = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), params)
  upd, _ = tx.update(grads, state, params)
  names = jax.tree.leaves(optim.param_names(params))
  for n, u in zip(names, jax.tree.leaves(upd)):
    if n.startswith("head"):
      assert float(jnp.abs(u).max()) > 0.5, n  # first Adam step ~ lr * sign(g), plus decay
    else:
      assert float(jnp.abs(u).max()) == 0.0, n
