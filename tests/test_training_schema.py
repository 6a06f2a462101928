"""One config schema: every setting has a default and a check; mistakes are named before anything runs."""

import os

import pytest

from hmar_jax import config_utils
from hmar_jax.training import schema, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "spec",
  [
    "tokenizer.py:tiny",
    "tokenizer.py:vqvae",
    "hmar.py:tiny",
    "hmar.py:d16",
    "hmar.py:d24",
    "hmar.py:d30",
    "hmar.py:d16_512",
    "var.py:tiny",
    "var.py:d20",
    "hmar_mask.py:tiny",
    "hmar_mask.py:d16",
  ],
)
def test_shipped_configs_are_valid(spec):
  config = config_utils.load_config_file(os.path.join(ROOT, "configs", spec))
  if config.task == "mask_finetune":
    config.init_from = ROOT  # any existing directory
  schema.validate(config)


def test_official_recipes_select_depth_by_argument():
  d24 = config_utils.load_config_file(os.path.join(ROOT, "configs", "hmar.py:d24"))
  assert (d24.model.depth, d24.model.width, d24.train.batch_size, d24.optim.lr) == (24, 1536, 768, 8e-5)
  d30 = config_utils.load_config_file(os.path.join(ROOT, "configs", "var.py:d30"))
  assert (d30.model.pattern, d30.train.batch_size, d30.loss.weighting) == ("block_causal", 1024, "uniform")
  with pytest.raises(ValueError, match="unknown variant 'd99x'"):
    config_utils.load_config_file(os.path.join(ROOT, "configs", "hmar.py:d99x"))


@pytest.mark.parametrize(
  "spec, scan_layers, remat",
  [
    ("hmar.py:d16", False, "auto"),
    ("hmar.py:d24", False, "auto"),
    ("var.py:d20", False, "auto"),
    ("hmar.py:d30", True, "dots"),
    ("hmar.py:d16_512", True, "dots"),
  ],
)
def test_official_recipes_choose_the_block_layout_by_size(spec, scan_layers, remat):
  config = config_utils.load_config_file(os.path.join(ROOT, "configs", spec))
  assert (config.model.scan_layers, config.model.remat_policy) == (scan_layers, remat)


def _nsp():
  return config_utils.load_config_file(os.path.join(ROOT, "configs", "hmar.py:tiny"))


def test_a_misspelt_key_is_named_with_the_nearest_valid_one():
  config = _nsp()
  config.train.batch_sise = 8
  with pytest.raises(
    schema.ConfigError,
    match=r"unknown config key config\.train\.batch_sise; did you mean "
    r"config\.train\.batch_size",
  ):
    schema.validate(config)


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda c: setattr(c.train, "batch_size", -4), r"config\.train\.batch_size must be a positive int"),
    (lambda c: setattr(c.train, "batch_size", 0), r"config\.train\.batch_size must be a positive int"),
    (lambda c: setattr(c.log, "every_steps", 0), r"config\.log\.every_steps must be a positive int"),
    (lambda c: setattr(c.optim, "lr", 0.0), r"config\.optim\.lr must be > 0"),
    (lambda c: setattr(c.train, "grad_accum_steps", 3), "not divisible by config.train.grad_accum_steps 3"),
    (lambda c: setattr(c.mesh, "shape", (2, 2)), r"config\.mesh\.shape: .*3 entries"),
    (lambda c: setattr(c.mesh, "rules", "zero3"), r"config\.mesh\.rules must be one of"),
    (lambda c: setattr(c.optim, "schedule", "cosine"), r"config\.optim\.schedule must be one of"),
    (lambda c: setattr(c.loss, "weighting", "log"), r"config\.loss\.weighting must be one of"),
    (lambda c: setattr(c.model, "num_heads", 3), "not divisible by model.num_heads"),
    (lambda c: setattr(c.model, "vocab_size", 512), "config.tokenizer.config and config.model disagree"),
    (lambda c: setattr(c.data, "source", "folder"), "is not a directory"),
    (lambda c: setattr(c.distributed, "mode", "explicit"), "needs config.distributed.coordinator_address"),
    (lambda c: setattr(c.sample, "top_p", 1.5), r"config\.sample\.top_p must be in \[0, 1\]"),
    (lambda c: setattr(c.sample, "top_k", -5), r"config\.sample\.top_k must be an int >= 0"),
    (lambda c: setattr(c.sample, "cfg", -3.0), r"config\.sample\.cfg must be a number >= 0"),
    (lambda c: setattr(c.train, "gpu_autotune_level", 7), r"config\.train\.gpu_autotune_level must be -1"),
    (lambda c: setattr(c.model, "remat_policy", "sometimes"), r"model\.remat_policy must be one of .*'auto'"),
  ],
)
def test_a_bad_setting_is_named(edit, message):
  config = _nsp()
  edit(config)
  with pytest.raises(schema.ConfigError, match=message):
    schema.validate(config)


def test_the_mesh_must_use_every_device():
  config = _nsp()
  config.mesh.shape = (2, 2, 1)
  with pytest.raises(schema.ConfigError, match="needs 4 devices, but 8 are available"):
    schema.validate(config, num_devices=8)


def test_masked_finetuning_needs_its_next_scale_model():
  config = config_utils.load_config_file(os.path.join(ROOT, "configs", "hmar_mask.py:tiny"))
  with pytest.raises(schema.ConfigError, match="config.init_from must name"):
    schema.validate(config)


def test_overrides_by_dotted_name_refuse_unknown_keys():
  config = schema.apply_overrides(_nsp(), {"train.num_steps": 7})
  assert config.train.num_steps == 7
  with pytest.raises(schema.ConfigError, match=r"unknown config key config\.trian"):
    schema.apply_overrides(config, {"trian.num_steps": 7})


@pytest.mark.parametrize(
  "schedule, message",
  [
    ("[[1], [1, 3], [1, 2, 5], [16], [36], [64]]", r"scale 2 \(3x3\) decides 8 tokens"),
    ("[[1], [4]]", r"has 2 entries but the model has 6 scales"),
    ("[[1], [1, 3]", "cannot parse mask schedule"),
    ("default", r"'default' is the official one for the 256 px scales"),
  ],
)
def test_a_mask_schedule_that_does_not_fit_the_model_is_named(schedule, message):
  config = _nsp()
  config.sample.mask_schedule = schedule
  with pytest.raises(schema.ConfigError, match=r"config\.sample\.mask_schedule: .*" + message):
    schema.validate(config)


def test_next_scale_training_refuses_a_refining_mask_schedule_for_its_grid():
  # The next-scale model is trained without its masked-prediction branch.
  config = _nsp()
  config.sample.mask_schedule = "[[1], [1, 3], [1, 2, 6], [16], [36], [64]]"
  with pytest.raises(schema.ConfigError, match="next-scale training has no masked-prediction branch"):
    schema.validate(config)
  config.task, config.init_from = "mask_finetune", ROOT
  config.loss.weighting = "mask_unweighted"
  config.loss.same_mask_positions_for_batch = True
  schema.validate(config)


def test_a_folder_data_source_without_class_subfolders_is_named(tmp_path):
  config = _nsp()
  config.data.source, config.data.path = "folder", str(tmp_path)
  (tmp_path / "image.png").write_bytes(b"")
  with pytest.raises(schema.ConfigError, match=r"config\.data\.path .* has no class subfolders"):
    schema.validate(config)


@pytest.mark.parametrize(
  "edit",
  [
    lambda c: setattr(c.train, "batch_size", -4),
    lambda c: setattr(c.train, "batch_size", 0),
    lambda c: setattr(c.log, "every_steps", 0),
    lambda c: setattr(c.train, "batch_sise", 8),
    lambda c: setattr(c.sample, "mask_schedule", "[[1]]"),
  ],
)
def test_training_refuses_a_bad_config_before_anything_is_built(edit, tmp_path, monkeypatch):
  def expensive(*args, **kwargs):
    raise AssertionError("reached past the config check")

  for name in ("initialize_distributed", "make_mesh", "make_task"):
    monkeypatch.setattr(trainer, name, expensive)
  config = _nsp()
  edit(config)
  with pytest.raises(schema.ConfigError):
    trainer.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
