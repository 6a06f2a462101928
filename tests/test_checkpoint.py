"""Checkpoint behaviour: round trips, key-named mismatch errors, no overwrite, resumable steps."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from hmar_jax import checkpoint


class TwoLayer(nnx.Module):
  def __init__(self, width: int, rngs: nnx.Rngs):
    self.inp = nnx.Linear(3, width, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(2)])


def _params(module):
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def test_params_round_trip_is_bit_identical(tmp_path):
  saved, fresh = TwoLayer(4, nnx.Rngs(0)), TwoLayer(4, nnx.Rngs(1))
  checkpoint.save_params(tmp_path / "ckpt", saved, metadata={"width": 4})
  checkpoint.restore_params(tmp_path / "ckpt", fresh)
  for a, b in zip(np.asarray(saved.inp.kernel), np.asarray(fresh.inp.kernel)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(saved.layers[1].bias.value, fresh.layers[1].bias.value)
  assert checkpoint.load_metadata(tmp_path / "ckpt") == {"width": 4}


def test_a_large_array_is_stored_in_chunks_no_larger_than_the_chunk_size_and_reads_back_bit_identical(
  tmp_path, monkeypatch
):
  monkeypatch.setattr(checkpoint, "PARAMS_CHUNK_BYTES", 64 << 10)
  big = np.random.default_rng(0).standard_normal((8, 64, 256)).astype(np.float32)  # 512 KiB
  checkpoint.save_params(tmp_path / "ckpt", {"big": big, "small": np.arange(5.0, dtype=np.float32)})
  stored = ocp.StandardCheckpointer().metadata(str(tmp_path / "ckpt" / "params")).item_metadata.tree
  chunk = stored["big"].storage.chunk_shape
  assert np.prod(chunk) * 4 <= 64 << 10 and tuple(chunk) != big.shape
  np.testing.assert_array_equal(checkpoint.read_params_tree(tmp_path / "ckpt")["big"], big)


def test_parameters_are_stored_uncompressed_so_reading_them_decompresses_nothing(tmp_path):
  # zstd shrinks random float32 by several percent (their exponent bytes repeat); stored raw, the
  # data files hold at least every byte of the array.
  big = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)  # 1 MiB
  checkpoint.save_params(tmp_path / "ckpt", {"big": big})
  data = os.path.join(tmp_path, "ckpt", "params")
  stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(data) for f in files)
  assert stored >= big.nbytes


def test_shape_mismatch_names_the_key_and_leaves_model_untouched(tmp_path):
  checkpoint.save_params(tmp_path / "ckpt", TwoLayer(4, nnx.Rngs(0)))
  other = TwoLayer(5, nnx.Rngs(2))
  before = np.asarray(other.inp.kernel.value).copy()
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"shape of inp/kernel"):
    checkpoint.restore_params(tmp_path / "ckpt", other)
  np.testing.assert_array_equal(other.inp.kernel.value, before)


def test_a_restore_kept_on_the_host_leaves_numpy_arrays_equal_to_the_saved_ones(tmp_path):
  saved = TwoLayer(4, nnx.Rngs(0))
  checkpoint.save_params(tmp_path / "ckpt", saved)
  host = checkpoint.restore_params(tmp_path / "ckpt", TwoLayer(4, nnx.Rngs(1)), on_host=True)
  assert all(type(x) is np.ndarray for x in jax.tree.leaves(_params(host)))
  jax.tree.map(np.testing.assert_array_equal, _params(host), _params(saved))


def test_placed_params_land_in_the_module_on_its_device(tmp_path):
  source, target = TwoLayer(4, nnx.Rngs(0)), TwoLayer(4, nnx.Rngs(1))
  host = jax.tree.map(np.asarray, _params(source))
  checkpoint.place_params(target, host)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(_params(target)))
  jax.tree.map(np.testing.assert_array_equal, _params(target), host)


def test_placing_params_of_another_shape_names_the_key_and_leaves_the_module_untouched():
  target = TwoLayer(5, nnx.Rngs(2))
  before = np.asarray(target.inp.kernel.value).copy()
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"shape of inp/kernel"):
    checkpoint.place_params(target, jax.tree.map(np.asarray, _params(TwoLayer(4, nnx.Rngs(0)))))
  np.testing.assert_array_equal(target.inp.kernel.value, before)


def test_missing_and_unexpected_keys_are_named():
  problems = checkpoint.compare_trees({"a": np.zeros(2), "b": np.zeros(3)}, {"a": np.zeros(2), "c": np.zeros(1)})
  assert problems == ["missing key b", "unexpected key c"]


def test_save_refuses_to_overwrite(tmp_path):
  os.makedirs(tmp_path / "ckpt")
  with pytest.raises(FileExistsError):
    checkpoint.save_params(tmp_path / "ckpt", TwoLayer(2, nnx.Rngs(0)))


def test_restore_from_a_non_checkpoint_folder_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not an hmar_jax parameter checkpoint"):
    checkpoint.restore_params(tmp_path, TwoLayer(2, nnx.Rngs(0)))


def test_params_read_for_a_tree_of_shapes_come_back_as_host_arrays_in_its_dtypes(tmp_path):
  saved = TwoLayer(4, nnx.Rngs(0))
  checkpoint.save_params(tmp_path / "ckpt", saved)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float16), _params(saved))
  host = checkpoint.read_params(tmp_path / "ckpt", shapes)
  assert all(type(x) is np.ndarray and x.dtype == np.float16 for x in jax.tree.leaves(host))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y, np.float16)), host, _params(saved))


def test_reading_params_for_a_tree_of_other_shapes_names_the_key(tmp_path):
  checkpoint.save_params(tmp_path / "ckpt", TwoLayer(4, nnx.Rngs(0)))
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _params(TwoLayer(5, nnx.Rngs(0))))
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"shape of inp/kernel"):
    checkpoint.read_params(tmp_path / "ckpt", shapes)
