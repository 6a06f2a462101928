"""Task 'mar' on the shared trainer: its loss, its data augmentation, its outputs and its config checks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import training_helpers as th
from flax import nnx
from PIL import Image

from hmar_jax import config_utils
from hmar_jax.models.mar_model import load_mar
from hmar_jax.training import schema
from hmar_jax.training.trainer import Trainer, make_task, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Four steps of the tiny MAR, saving at step 2, plus the same run resumed from that checkpoint."""
  root = tmp_path_factory.mktemp("mar")
  c = th.mar_config(steps=4)
  c.checkpoint.every_steps = 2
  whole = train(c, str(root / "whole"))
  c2 = th.mar_config(steps=2)
  c2.checkpoint.every_steps = 2
  train(c2, str(root / "resumed"))
  resumed = train(c, str(root / "resumed"))
  return {"root": root, "whole": whole, "resumed": resumed, "config": c}


def _losses(workdir):
  return [row["loss"] for row in th.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def test_a_resumed_run_repeats_the_losses_of_the_uninterrupted_run(run):
  whole = _losses(run["root"] / "whole")
  resumed = _losses(run["root"] / "resumed")
  assert len(whole) == 4 and all(np.isfinite(whole))
  np.testing.assert_allclose(resumed[-2:], whole[-2:], rtol=1e-6)


def test_the_saved_parameters_are_the_ema_and_load_as_a_mar_model(run):
  params_dir = run["whole"]["params"]
  model = load_mar(params_dir)
  task = make_task(run["config"], str(run["root"] / "whole"))
  trainer = Trainer(run["config"], str(run["root"] / "whole"), task=task)
  state, _, _ = trainer.restore_or_init(trainer.checkpoints())
  saved = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ema = jax.device_get(state.ema_params)
  trained = jax.device_get(state.params)
  np.testing.assert_array_equal(saved["backbone"]["mask_token"], ema["backbone"]["mask_token"])
  assert not np.array_equal(saved["backbone"]["mask_token"], trained["backbone"]["mask_token"])


def test_the_loss_is_the_model_loss_on_the_scaled_posterior_sample_of_the_flipped_images(run):
  c = run["config"]
  task = make_task(c, str(run["root"] / "loss"))
  trainer = Trainer(c, str(run["root"] / "loss"), task=task)
  with trainer.mesh_context():
    state = trainer.init_state()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3], jnp.int32)
  key = jax.random.key(1)
  loss, _, _ = task.loss(state.params, state, {"image": images, "label": labels}, key)
  # Re-stated: the same key split, flip where the Bernoulli draw says so, encode, patchify, MARModel.loss.
  k_flip, k_vae, k_loss = jax.random.split(key, 3)
  flipped = task.augment(images, k_flip)
  vae = nnx.merge(task._vae_def, state.frozen["vae"])
  latents = vae.encode_latents(flipped, k_vae)
  tokens = latents.reshape(4, -1, latents.shape[-1])  # patch size 1: row-major tokens
  want, _ = task.model(state.params).loss(tokens, labels, k_loss)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)


def test_the_augmentation_flips_left_right_the_rows_its_key_draws(run):
  task = make_task(run["config"], str(run["root"] / "flip"))
  images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  key = jax.random.key(1)
  out = np.asarray(task.augment(jnp.asarray(images), key))
  flip = np.asarray(jax.random.bernoulli(key, 0.5, (4,)))
  assert 0 < flip.sum() < 4  # both branches are exercised with this key
  for i in range(4):
    np.testing.assert_array_equal(out[i], images[i, :, ::-1] if flip[i] else images[i])


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_naming_both():
  c = th.mar_config()
  c.model.vae_embed_dim = 8
  with pytest.raises(schema.ConfigError, match="embed_dim 16 vs model vae_embed_dim 8"):
    schema.validate(c)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("cfg", 0.5, "config.sample.cfg must be >= 1"),
    ("cfg_schedule", "cosine", "config.sample.cfg_schedule"),
    ("temperature", 0.0, "config.sample.temperature"),
    ("num_iter", 0, "config.sample.num_iter"),
  ],
)
def test_bad_sampling_settings_are_refused_before_training(field, value, message):
  c = th.mar_config()
  c.sample[field] = value
  with pytest.raises(schema.ConfigError, match=message):
    schema.validate(c)


def test_an_unknown_model_field_is_named():
  c = th.mar_config()
  c.model.encoder_dpeth = 2
  with pytest.raises(schema.ConfigError, match="encoder_dpeth"):
    schema.validate(c)


@pytest.mark.parametrize(
  "spec", [f"{name}.py:{v}" for name in ("mar", "himar") for v in ("tiny", "base", "large", "huge")]
)
def test_the_shipped_mar_and_himar_configs_are_valid(spec):
  schema.validate(config_utils.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", spec)))


@pytest.mark.parametrize("make", [th.mar_config, th.himar_config], ids=["mar", "himar"])
def test_the_end_of_training_writes_the_parameters_and_a_sample_grid(make, tmp_path):
  c = make(steps=1)
  c.sample.grid_at_end = True
  c.sample.per_class = 1
  c.sample.num_iter = 1
  c.data.num_classes = 2
  out = train(c, str(tmp_path))
  grid = np.asarray(Image.open(out["samples"]))
  assert grid.shape[:2] == (2 + 2 * (16 + 2), 2 + (16 + 2))  # two classes, one image each, 2 px padding
  assert os.path.isdir(out["params"])
