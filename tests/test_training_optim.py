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


def _numpy_adamw(params, grad_steps, *, lr, b1, b2, eps, wd, clip):
  """float64 AdamW (decoupled decay on every leaf given) with the global-norm clip over these grads only.

  params: {name: array}; grad_steps: list of {name: array}. Returns the params after all steps.
  """
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grad_steps, start=1):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
    scale = min(1.0, clip / norm)
    for k in p:
      gk = g[k] * scale
      m[k] = b1 * m[k] + (1 - b1) * gk
      v[k] = b2 * v[k] + (1 - b2) * gk * gk
      m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p[k])
  return p


def test_frozen_params_get_no_update_and_clipping_ignores_them():
  # Adam is invariant to one common gradient scale, so a clip factor shows only when it differs
  # between steps: the trainable norm is 10 at the first step (clipped to 2) and 1 at the second
  # (not clipped). The frozen grads are huge at both: clipping over all grads would shrink both
  # trainable steps by about the same factor and change the second update.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), _params())
  names = jax.tree.leaves(optim.param_names(params))
  is_trainable = lambda n: n.startswith("head")
  head_dirs = [rng.normal(size=(4, 6)) for _ in range(2)]
  head_grads = [d / np.linalg.norm(d) * norm for d, norm in zip(head_dirs, (10.0, 1.0))]

  def grads_at(step):
    return jax.tree.map(
      lambda n, x: jnp.asarray(head_grads[step] if is_trainable(n) else np.full(x.shape, 1e4), jnp.float32),
      optim.param_names(params),
      params,
    )

  lr, wd, clip = 0.1, 0.05, 2.0
  tx = optim.make_optimizer(learning_rate=lr, weight_decay=wd, grad_clip=clip, trainable=is_trainable)
  state, new = tx.init(params), params
  for step in range(2):
    upd, state = tx.update(grads_at(step), state, new)
    new = optax.apply_updates(new, upd)

  want = _numpy_adamw(
    {"head": np.asarray(params["head"]["kernel"])},
    [{"head": g} for g in head_grads],
    lr=lr,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    wd=wd,
    clip=clip,
  )["head"]
  np.testing.assert_allclose(np.asarray(new["head"]["kernel"]), want, rtol=1e-5, atol=1e-6)
  for n, before, after in zip(names, jax.tree.leaves(params), jax.tree.leaves(new)):
    if not is_trainable(n):
      np.testing.assert_array_equal(np.asarray(after), np.asarray(before), err_msg=n)
