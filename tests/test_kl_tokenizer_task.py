"""Training MAR's KL VAE on the shared trainer (task 'kl_tokenizer'): it learns, resumes exactly, writes a
loadable tokenizer, its loss is reconstruction + LDM's KL term, and bad configs fail before compiling.

One short run of a 16 px KL VAE (module fixture) serves several tests, to keep compiles few.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from training_helpers import read_jsonl

from hmar_jax import config_utils
from hmar_jax.tokenizer.kl_vae import kl_vae_config, load_kl_vae, mode
from hmar_jax.training import schema
from hmar_jax.training.tasks.kl_tokenizer import KLTokenizerTask
from hmar_jax.training.trainer import Trainer, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 30
RESUME_FROM = 20


def small_config(steps: int = NUM_STEPS):
  """configs/kl_tokenizer.py:tiny shrunk to 16 px images (4 x 4 x 16 latents), for tests."""
  c = config_utils.load_config_file(os.path.join(ROOT, "configs", "kl_tokenizer.py:tiny"))
  c.model = kl_vae_config("tiny")
  c.model.resolution = 16
  c.model.enc_attn_resolutions = (4,)
  c.model.image_size = 16
  c.train.batch_size = 8
  c.data.num_examples = 256
  c.data.num_threads = 1
  c.data.num_eval_images = 8
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.train.num_steps = steps
  c.log.every_steps = 5
  c.log.tensorboard = False
  c.checkpoint.every_steps = RESUME_FROM
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("kl_tokenizer_run"))
  config = small_config()
  result = train(config, workdir)
  return config, workdir, result


def _losses(workdir) -> dict:
  return {m["step"]: m["loss"] for m in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def test_a_few_steps_lower_the_training_loss_and_the_heldout_error(trained):
  _, workdir, result = trained
  losses = _losses(workdir)
  assert sorted(losses) == list(range(5, NUM_STEPS + 1, 5))
  assert losses[NUM_STEPS] < 0.7 * losses[5], losses
  assert result["eval_mse_final"] < result["eval_mse_initial"], result


def test_the_saved_tokenizer_loads_and_reconstructs_as_the_trained_state_did(trained):
  config, workdir, result = trained
  loaded = load_kl_vae(os.path.join(workdir, "tokenizer"))
  images = KLTokenizerTask(config, workdir).eval_images()
  graphdef, state = nnx.split(loaded)
  recons = jax.jit(lambda s, x: nnx.merge(graphdef, s).reconstruct(x))(state, jnp.asarray(images))
  mse = float(np.mean(np.square(np.asarray(recons, np.float64) - images)))
  # result.json's MSE was computed from the trained state before it was saved.
  np.testing.assert_allclose(mse, result["eval_mse_final"], rtol=1e-6)
  assert os.path.isfile(result["png"]) and np.isfinite(result["latent_std"])


def test_the_saved_latent_scale_gives_the_held_out_latents_unit_spread(trained):
  config, workdir, result = trained
  assert config.normalize_latents  # configs/kl_tokenizer.py:tiny, the quick start's MAR tokenizer
  loaded = load_kl_vae(os.path.join(workdir, "tokenizer"))
  np.testing.assert_allclose(loaded.latent_scale, 1.0 / result["latent_std"], rtol=1e-12)
  images = KLTokenizerTask(config, workdir).eval_images()
  graphdef, state = nnx.split(loaded)
  means = jax.jit(lambda s, x: mode(nnx.merge(graphdef, s).encode(x)))(state, jnp.asarray(images))
  np.testing.assert_allclose(np.std(np.asarray(means, np.float64)) * loaded.latent_scale, 1.0, rtol=1e-5)


def test_a_resumed_run_repeats_the_losses_of_the_uninterrupted_run(trained, tmp_path):
  config, workdir, _ = trained
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(os.path.join(resumed_dir, "checkpoints", str(NUM_STEPS)))
  os.remove(os.path.join(resumed_dir, "metrics.jsonl"))
  result = train(config, resumed_dir)
  assert result["step"] == NUM_STEPS
  resumed, original = _losses(resumed_dir), _losses(workdir)
  assert sorted(resumed) == [25, 30]
  for step, loss in resumed.items():
    assert loss == original[step], (step, loss, original[step])


def test_the_loss_is_reconstruction_plus_the_pixel_normalised_kl(tmp_path):
  config = small_config(steps=1)
  config.loss.kl_weight = 5.0  # large enough for the KL term to matter in the comparison
  trainer = Trainer(config, str(tmp_path / "run"))
  task = trainer.task
  state = trainer.init_state()
  images = jnp.asarray(task.eval_images())
  key = jax.random.key(3)
  loss, metrics, _ = jax.jit(lambda s, b, k: task.loss(s.params, s, b, k))(state, {"image": images}, key)
  # Independently: decode a posterior sample drawn with the same key, then the losses in float64.
  eps = jax.random.normal(key, (8, 4, 4, 16), jnp.float32)

  def forward(m, x):
    moments = m.encode(x)
    mean, logvar = moments[..., :16], jnp.clip(moments[..., 16:], -30, 20)
    return mean, logvar, m.decode(mean + jnp.exp(0.5 * logvar) * eps)

  mean, logvar, recon = (
    np.asarray(a, np.float64)
    for a in nnx.jit(forward)(task.model(state.params, state.frozen, state.model_vars), images)
  )
  x = np.asarray(images, np.float64)
  kl_per_image = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  want = np.mean(np.abs(recon - x)) + np.mean((recon - x) ** 2) + 5.0 * kl_per_image.mean() / (16 * 16 * 3)
  np.testing.assert_allclose(float(metrics["kl"]), kl_per_image.mean(), rtol=1e-4)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda c: setattr(c.loss, "kl_weight", -1.0), r"config\.loss\.kl_weight must be >= 0"),
    (lambda c: setattr(c.model, "vocab_size", 4096), r"unknown config key config\.model\.vocab_size"),
    (lambda c: setattr(c.model, "image_size", 18), "image_size 18 is not divisible"),
    (lambda c: (setattr(c.disc, "enabled", True), setattr(c.disc, "num_layers", 4)), "needs images of at least"),
  ],
)
def test_a_bad_config_fails_naming_the_field_before_compiling(edit, message, tmp_path):
  config = small_config()
  edit(config)
  with pytest.raises(ValueError, match=message):
    Trainer(config, str(tmp_path))


def test_the_vq_codebook_section_is_not_a_kl_tokenizer_setting():
  config = small_config()
  config.codebook = schema.default_config("tokenizer").codebook
  with pytest.raises(schema.ConfigError, match=r"unknown config key config\.codebook"):
    schema.validate(config)


@pytest.mark.parametrize("variant", ["tiny", "kl16"])
def test_shipped_configs_are_valid_kl_tokenizer_configs(variant):
  config = config_utils.load_config_file(os.path.join(ROOT, "configs", f"kl_tokenizer.py:{variant}"))
  assert config.task == "kl_tokenizer"
  schema.validate(config)
