"""Task 'himar' on the shared trainer: it learns on the built-in data and feeds both stages."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import training_helpers as th

from hmar_jax.tokenizer.resize import bicubic_resize
from hmar_jax.training import schema
from hmar_jax.training.trainer import Trainer, make_task, train

STEPS = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """STEPS steps of the tiny Hi-MAR on the built-in shapes."""
  root = tmp_path_factory.mktemp("himar")
  c = th.himar_config(steps=STEPS, batch=8, examples=256)
  c.optim.lr = 2e-2
  whole = train(c, str(root / "whole"))
  return {"root": root, "whole": whole, "config": c}


def _rows(workdir):
  return th.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def test_training_lowers_both_stages_losses_on_the_built_in_data(run):
  rows = _rows(run["root"] / "whole")
  assert len(rows) == STEPS
  # Stage 2's loss is a mean over all tokens of the masked tokens' error (official), so it follows the
  # batch's cosine mask ratio: divided by the ratio it is the error per masked token. Medians, since the
  # variational-bound term of stage 1 spikes now and then.
  per_masked = [r["loss_stage2"] / r["mask_ratio_stage2"] for r in rows]
  # Measured (medians of the first and last 8 steps): stage 1 0.97 -> 0.71, stage 2 per masked token
  # 1.00 -> 0.87; a model that does not learn keeps both near 1.
  for name, values, bound in (("stage 1", [r["loss_stage1"] for r in rows], 0.85), ("stage 2", per_masked, 0.93)):
    first, last = np.median(values[:8]), np.median(values[-8:])
    assert last < bound * first, f"{name}: median of the first 8 steps {first:.4f}, of the last 8 {last:.4f}"


def test_the_total_is_the_weighted_sum_of_the_two_stages(run):
  for r in _rows(run["root"] / "whole"):
    np.testing.assert_allclose(r["loss"], 0.4 * r["loss_stage1"] + 0.6 * r["loss_stage2"], rtol=1e-5)


def test_the_low_resolution_tokens_encode_the_downsampled_images(run):
  c = run["config"]
  task = make_task(c, str(run["root"] / "lowres"))
  trainer = Trainer(c, str(run["root"] / "lowres"), task=task)
  with trainer.mesh_context():
    state = trainer.init_state()
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  key = jax.random.key(0)
  got = task.low_res_tokens(state.frozen, images, key)
  assert got.shape == (2, c.model.cond_scale**2, c.model.cond_dim)
  want = task.tokens(state.frozen, bicubic_resize(images, (8, 8)), key)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_the_pivot_schedule_clock_is_the_epoch_of_the_step(run):
  task = make_task(run["config"], str(run["root"] / "epoch"))
  per_epoch = 256 // 8
  assert float(task.epoch(jnp.int32(per_epoch - 1))) == 0.0
  assert float(task.epoch(jnp.int32(3 * per_epoch))) == 3.0


def test_a_stage1_guidance_below_one_is_refused():
  c = th.himar_config()
  c.sample.re_cfg = 0.5
  with pytest.raises(schema.ConfigError, match="config.sample.re_cfg"):
    schema.validate(c)
