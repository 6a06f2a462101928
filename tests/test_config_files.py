"""The shipped config files through the command-line parser: every documented override reaches the
config, and what it sets is what the training and sampling code reads."""

import os
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from hmar_jax import cli, main
from hmar_jax.sampling import validate_mask_schedule
from hmar_jax.training import schema, token_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
COLOURS = {"cat": [(255, 0, 0), (0, 0, 255)], "dog": [(0, 255, 0)]}  # class -> one solid colour per image


def _parse_config(*args, monkeypatch, lock_config=True):
  """The config that `prog ARGS` gives a --config file flag (overrides are read from sys.argv)."""
  argv = ["prog", *args]
  monkeypatch.setattr(sys, "argv", argv)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, lock_config=lock_config)
  cli.parse_flags(argv, values)
  return values.config


def _image_folder(root):
  """root/<class>/<i>.png: 32 x 32 solid-colour PNGs (the tiny configs' image size)."""
  for name, colours in COLOURS.items():
    os.makedirs(root / name)
    for i, colour in enumerate(colours):
      Image.new("RGB", (32, 32), colour).save(root / name / f"{i}.png")
  return root


def test_the_quickstart_mask_schedule_can_be_replaced_on_the_command_line(monkeypatch):
  config = _parse_config(
    f"--config={CONFIGS}/quickstart.py",
    "--config.sample.mask_schedule=none",
    monkeypatch=monkeypatch,
    lock_config=False,
  )
  assert config.sample.mask_schedule == "none"
  new = "[[1], [1, 3], [1, 1, 7], [16], [36], [64]]"
  config = _parse_config(
    f"--config={CONFIGS}/quickstart.py", f"--config.sample.mask_schedule={new}", monkeypatch=monkeypatch
  )
  patch_nums = config.mask.model.patch_nums
  assert validate_mask_schedule(config.sample.mask_schedule, patch_nums) == (
    (1,),
    (1, 3),
    (1, 1, 7),
    (16,),
    (36,),
    (64,),
  )


def test_the_quickstart_config_passes_the_checks_made_before_its_first_stage(tmp_path, monkeypatch):
  config = _parse_config(f"--config={CONFIGS}/quickstart.py", monkeypatch=monkeypatch, lock_config=False)
  main.check_quickstart(config, str(tmp_path / "run"))
  config.sample.mask_schedule = "[[1], [4], [9], [16], [36]]"
  with pytest.raises(ValueError, match=r"config\.sample\.mask_schedule: mask schedule has 5 entries"):
    main.check_quickstart(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  "spec", ["tokenizer.py:tiny", "hmar.py:tiny", "var.py:tiny", "hmar_mask.py:tiny", "hmar.py:d16"]
)
def test_every_task_takes_an_image_folder_from_the_command_line(spec, tmp_path, monkeypatch):
  folder = _image_folder(tmp_path / "images")
  config = _parse_config(
    f"--config={CONFIGS}/{spec}",
    "--config.data.source=folder",
    f"--config.data.path={folder}",
    f"--config.init_from={tmp_path}" if spec.startswith("hmar_mask") else "--config.seed=0",
    monkeypatch=monkeypatch,
  )
  assert (config.data.source, config.data.path) == ("folder", str(folder))
  schema.validate(config)


def test_the_next_scale_data_pipeline_reads_the_image_folder_of_its_config(tmp_path, monkeypatch):
  folder = _image_folder(tmp_path / "images")
  config = _parse_config(
    f"--config={CONFIGS}/hmar.py:tiny",
    "--config.data.source=folder",
    f"--config.data.path={folder}",
    monkeypatch=monkeypatch,
  )
  source = token_cache.image_source(config.data, config.tokenizer.config.image_size)
  records = [source[i] for i in range(len(source))]
  expected = [(label, colour) for label, name in enumerate(sorted(COLOURS)) for colour in COLOURS[name]]
  assert [int(r["label"]) for r in records] == [label for label, _ in expected]
  for record, (_, colour) in zip(records, expected, strict=True):
    np.testing.assert_array_equal(record["image"], np.broadcast_to(np.uint8(colour), (32, 32, 3)))
