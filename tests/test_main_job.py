"""The README's main job runs every stage end to end and leaves PNGs a person can look at."""

import os

import numpy as np
from PIL import Image

from hmar_jax import config_utils
from hmar_jax.main import run_quickstart

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_quickstart_runs_all_stages_with_few_steps(tmp_path):
  config = config_utils.load_config_file(os.path.join(ROOT, "configs", "quickstart.py"))
  config.tokenizer.train.num_steps = 10
  config.tokenizer.optim.warmup_steps = 2
  config.nsp.train.num_steps = 10
  config.nsp.data.num_examples = 256
  config.mask.train.num_steps = 5
  config.sample.per_class = 2
  out = run_quickstart(config, str(tmp_path))

  samples = np.asarray(Image.open(out["samples"]))
  num_classes, size = config.tokenizer.data.num_classes, config.tokenizer.model.image_size
  # One row per class, per_class columns, each tile image_size plus a separating border.
  assert samples.shape[0] >= num_classes * size and samples.shape[1] >= 2 * size
  assert samples.std() > 0  # not a blank image
  assert os.path.exists(out["reconstructions"])
  assert os.path.isdir(out["mask_params"]) and os.path.isdir(out["nsp_params"])
  # Finetuning reuses the next-scale stage's token cache instead of tokenising again.
  assert not os.path.exists(tmp_path / "mask" / "tokens.npz")
