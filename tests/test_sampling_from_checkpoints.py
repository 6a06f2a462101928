"""A sampler made from checkpoints compiles while its weights are read (hmar_jax/sample.py
sampler_from_checkpoints, Sampler.load_weights_in_background): the same images as a sampler of the
loaded modules, a wrong checkpoint refused before anything compiles, no sampling without weights."""

import os

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx
from PIL import Image
from sampling_helpers import tiny_transformer, tiny_vqvae, tiny_vqvae_config

from hmar_jax import checkpoint, sample
from hmar_jax.models.config import tiny_model_config
from hmar_jax.sampling import Sampler
from hmar_jax.tokenizer.vqvae import VQVAE, save_vqvae

LABELS = np.asarray([0, 3, 7, 9], np.int32)
SCHEDULE = [[1], [1, 3], [1, 2, 6], [25], [64]]  # for the tiny patch_nums (1, 2, 3, 5, 8)
KW = dict(cfg=1.5, top_k=5, top_p=0.9, mask_schedule=SCHEDULE)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """(params dir, tokenizer dir) of the tiny HMAR (list layout, as converted weights are) and VQVAE."""
  root = tmp_path_factory.mktemp("ckpt")
  params, tokenizer = str(root / "params"), str(root / "vae")
  checkpoint.save_params(params, tiny_transformer("hmar", 1), metadata={"model": tiny_model_config("hmar").to_dict()})
  save_vqvae(tokenizer, tiny_vqvae(0))
  return params, tokenizer


@pytest.fixture(scope="module")
def want(checkpoints):
  params, tokenizer = checkpoints
  loaded = Sampler(sample.load_transformer(params), sample.load_vqvae(tokenizer))
  return np.asarray(loaded.sample(LABELS, 3, **KW))


def _compiles():
  """The names of the programs compiled from now on."""
  names = []
  jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: names.append(kw.get("fun_name")) if "backend_compile" in event else None
  )
  return names


def _pieces(names):
  return [n for n in names if n and any(p in n for p in ("nsp_step", "mask_step", "update", "decode"))]


def test_a_sampler_made_from_checkpoints_gives_the_loaded_models_images(checkpoints, want):
  sampler = sample.sampler_from_checkpoints(*checkpoints)
  sampler.precompile(LABELS, workers=2, **KW)
  compiled = _compiles()
  np.testing.assert_array_equal(np.asarray(sampler.sample(LABELS, 3, **KW)), want)
  assert _pieces(compiled) == []  # precompiled for the weights' shapes before they arrived


def test_a_var_sampler_made_from_checkpoints_gives_the_loaded_models_images(checkpoints, tmp_path):
  params = str(tmp_path / "var_params")
  checkpoint.save_params(params, tiny_transformer("var", 2), metadata={"model": tiny_model_config("var").to_dict()})
  kw = dict(cfg=1.5, top_k=5, top_p=0.9)
  want = np.asarray(Sampler(sample.load_transformer(params), sample.load_vqvae(checkpoints[1])).sample(LABELS, 1, **kw))
  sampler = sample.sampler_from_checkpoints(params, checkpoints[1])
  sampler.precompile(LABELS, workers=2, **kw)  # the KV cache's shapes come from the abstract model
  np.testing.assert_array_equal(np.asarray(sampler.sample(LABELS, 1, **kw)), want)


def test_the_weights_arrive_where_place_put_the_abstract_ones(checkpoints):
  sampler = sample.sampler_from_checkpoints(*checkpoints)
  mesh = jax.make_mesh((1,), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sampler.place(replicated)
  sampler.decode(np.zeros((1, 8, 8, tiny_vqvae_config().z_channels), np.float32))  # waits for the weights
  for leaf in jax.tree.leaves((sampler._model_state, sampler._vq_state)):
    assert isinstance(leaf, jax.Array) and leaf.sharding == replicated


def test_a_checkpoint_whose_arrays_do_not_fit_its_config_is_refused_before_anything_compiles(checkpoints, tmp_path):
  config = tiny_model_config("hmar")
  config.width *= 2
  params = str(tmp_path / "params")
  checkpoint.save_params(params, tiny_transformer("hmar", 1), metadata={"model": config.to_dict()})
  compiled = _compiles()
  with pytest.raises(checkpoint.CheckpointMismatchError, match="does not match the model: .*shape of"):
    sample.sampler_from_checkpoints(params, checkpoints[1])
  assert compiled == []


def test_a_tokenizer_of_another_vocabulary_is_refused_before_anything_compiles(checkpoints, tmp_path):
  config = tiny_vqvae_config()
  config.vocab_size *= 2
  other = str(tmp_path / "other_vae")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VQVAE(config, rngs=nnx.Rngs(0))))
  save_vqvae(other, nnx.merge(graphdef, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state)))
  compiled = _compiles()
  with pytest.raises(ValueError, match="does not match the model"):
    sample.sampler_from_checkpoints(checkpoints[0], other)
  assert compiled == []


def test_a_load_that_fails_is_raised_by_the_sample_that_waits_for_it(checkpoints):
  model, vqvae = sample.abstract_transformer(checkpoints[0]), sample.abstract_vqvae_of_checkpoint(checkpoints[1])
  sampler = Sampler(model, vqvae)

  def load():
    raise checkpoint.CheckpointCorruptError("array blocks/0/fc1/kernel does not match its checksum")

  sampler.load_weights_in_background(load)
  sampler.precompile(LABELS, workers=2, **KW)
  with pytest.raises(checkpoint.CheckpointCorruptError, match="fc1/kernel"):
    sampler.sample(LABELS, 0, **KW)


def test_the_weights_are_read_only_once_every_program_is_traced(checkpoints):
  sampler = sample.sampler_from_checkpoints(*checkpoints, program_cache=None)  # programs traced, not read
  lower_all, started = sampler._lower_all, []

  def lowering_then_check(*args):
    lowered = lower_all(*args)
    started.append(not callable(sampler._pending))
    return lowered

  sampler._lower_all = lowering_then_check
  sampler.precompile(LABELS, workers=2, **KW)
  assert started == [False] and not callable(sampler._pending)  # started after tracing, before compiling


def test_a_sampler_of_shapes_only_refuses_to_sample_naming_what_it_needs(checkpoints):
  sampler = Sampler(sample.abstract_transformer(checkpoints[0]), sample.abstract_vqvae_of_checkpoint(checkpoints[1]))
  with pytest.raises(ValueError, match="shapes only .* update_model or load_weights_in_background"):
    sampler.sample(LABELS, 0)


def _command_line(checkpoints, **settings):
  """`python -m hmar_jax.sample` on the checkpoints, classes 0 and 3 twice each, with KW's options
  and `settings` (flag name: value)."""
  params, tokenizer = checkpoints
  values = flags.FlagValues()
  sample.define_flags(values)
  values(["prog", f"--params={params}", f"--tokenizer={tokenizer}", "--classes=0,3", "--per_class=2"])
  values.mask_schedule, values.cfg, values.top_k, values.top_p = str(SCHEDULE), 1.5, 5, 0.9
  for name, value in settings.items():
    setattr(values, name, value)
  sample.run(values)


def _loaded_sampler(checkpoints):
  return Sampler(sample.load_transformer(checkpoints[0]), sample.load_vqvae(checkpoints[1]))


def test_the_command_line_draws_the_grid_the_loaded_models_draw(checkpoints, tmp_path):
  _command_line(checkpoints, seed=3, out=str(tmp_path / "cli.png"))
  loaded = sample.sample_grid_to_png(
    _loaded_sampler(checkpoints), str(tmp_path / "loaded.png"), classes=[0, 3], per_class=2, seed=3, **KW
  )
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cli.png")), np.asarray(Image.open(loaded)))


def test_the_command_line_at_scale_draws_the_loaded_models_images(checkpoints, tmp_path):
  from hmar_jax.sampling.at_scale import class_labels, sample_to_dir  # noqa: PLC0415

  _command_line(checkpoints, seed=1, batch_size=4, out_dir=str(tmp_path / "cli"))
  labels = class_labels([0, 3], 2)
  path = sample_to_dir(
    _loaded_sampler(checkpoints), str(tmp_path / "loaded"), labels, batch_size=4, seed=1, show_progress=False, **KW
  )
  with np.load(path) as want, np.load(os.path.join(tmp_path, "cli", os.path.basename(path))) as got:
    np.testing.assert_array_equal(got["arr_0"], want["arr_0"])
