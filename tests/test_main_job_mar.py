"""The main job's MAR and Hi-MAR quick starts (--family=mar / himar) run end to end and write their PNGs.

Separate from test_main_job.py so the test runner's two processes share the quick starts' minutes.
"""

import os

import numpy as np
from PIL import Image
from test_main_job import MIN_TILE_STD, ROOT, _check_decoded_tiles, _data_colour, _tiles

from hmar_jax import config_utils
from hmar_jax.main import family_from_argv, run_mar_quickstart


def test_the_mar_quickstart_trains_the_kl_vae_and_mar_then_samples_a_grid(tmp_path):
  config = config_utils.load_config_file(os.path.join(ROOT, "configs", "quickstart.py:mar"))
  config.tokenizer.train.num_steps = 10
  config.tokenizer.optim.warmup_steps = 2
  config.mar.train.num_steps = 10
  config.mar.optim.warmup_steps = 2
  config.mar.data.num_examples = 256
  config.sample.per_class = 2
  config.sample.num_iter = 2
  out = run_mar_quickstart(config, str(tmp_path))

  num_classes, size = config.tokenizer.data.num_classes, config.tokenizer.model.image_size
  colour = _data_colour(config.tokenizer.data, size)
  pairs = -(-int(config.tokenizer.data.num_eval_images) // 8)
  recon = _tiles(np.asarray(Image.open(out["reconstructions"])), 2 * pairs, 8, size)
  _check_decoded_tiles(recon[1::2], colour)
  # Ten steps leave the diffusion head untrained: the grid is checked for its layout and for images
  # that are not blank, one row per class.
  samples = _tiles(np.asarray(Image.open(out["samples"])), num_classes, config.sample.per_class, size)
  assert (samples.reshape(-1, size * size * 3).std(axis=1) > MIN_TILE_STD).all()
  assert os.path.isdir(out["mar_params"])


def test_the_himar_quickstart_trains_the_kl_vae_and_himar_then_samples_a_grid(tmp_path):
  config = config_utils.load_config_file(os.path.join(ROOT, "configs", "quickstart.py:himar"))
  config.tokenizer.train.num_steps = 4
  config.tokenizer.optim.warmup_steps = 1
  config.himar.train.num_steps = 4
  config.himar.optim.warmup_steps = 1
  config.himar.data.num_examples = 64
  config.himar.model.gdm_num_sampling_steps = "2"
  config.himar.model.cond_scale = 2  # 2 x 2 pivots: 8 stage-1 sampling steps instead of 16
  config.sample.per_class = 1
  config.sample.num_iter = 1
  out = run_mar_quickstart(config, str(tmp_path))
  num_classes, size = config.tokenizer.data.num_classes, config.tokenizer.model.image_size
  samples = _tiles(np.asarray(Image.open(out["samples"])), num_classes, config.sample.per_class, size)
  assert (samples.reshape(-1, size * size * 3).std(axis=1) > MIN_TILE_STD).all()
  assert os.path.isdir(out["himar_params"])


def test_the_family_flag_is_read_before_the_flags_are_parsed():
  assert family_from_argv(["main", "--family=mar"]) == "mar"
  assert family_from_argv(["main", "--family", "mar", "--workdir=x"]) == "mar"
  assert family_from_argv(["main", "--workdir=x"]) == "hmar"
