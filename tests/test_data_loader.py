"""The training loader: one global order, disjoint per-process slices, restart by step or by state,
and unreadable records skipped and counted."""

import multiprocessing
import os
import signal

import numpy as np
import pytest

from hmar_jax.data.augment import RandomCrop
from hmar_jax.data.loader import ArraySource, SkipUnreadable, make_train_loader
from hmar_jax.data.procedural import ProceduralShapes
from hmar_jax.data.sources import CorruptImageError


def _source(n=40):
  return ArraySource({"x": np.arange(n, dtype=np.int32), "y": np.arange(n, dtype=np.int32) * 10})


def _take(loader, k):
  it = iter(loader)
  return [next(it)["x"].tolist() for _ in range(k)]


def test_processes_read_disjoint_halves_that_make_the_single_process_batch():
  whole = _take(make_train_loader(_source(), global_batch=8, seed=3, num_threads=0), 12)
  halves = [
    _take(make_train_loader(_source(), global_batch=8, seed=3, process_index=p, process_count=2, num_threads=0), 12)
    for p in range(2)
  ]
  for t in range(12):
    assert halves[0][t] + halves[1][t] == whole[t]
    assert not set(halves[0][t]) & set(halves[1][t])


def test_every_example_appears_once_per_epoch_in_a_new_order():
  batches = _take(make_train_loader(_source(), global_batch=8, seed=0, num_threads=0), 10)
  epoch0, epoch1 = sum(batches[:5], []), sum(batches[5:], [])
  assert sorted(epoch0) == sorted(epoch1) == list(range(40))
  assert epoch0 != epoch1


def test_a_loader_started_at_step_t_continues_the_order():
  full = _take(make_train_loader(_source(), global_batch=8, seed=1, num_threads=0), 9)
  assert _take(make_train_loader(_source(), global_batch=8, seed=1, start_step=6, num_threads=0), 3) == full[6:]


def test_iterator_state_restores_the_position():
  loader = make_train_loader(_source(), global_batch=8, seed=1, num_threads=2)
  it = iter(loader)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it)["x"].tolist() for _ in range(2)]
  again = iter(make_train_loader(_source(), global_batch=8, seed=1, num_threads=2))
  again.set_state(state)
  assert [next(again)["x"].tolist() for _ in range(2)] == want


def test_a_batch_larger_than_the_data_is_refused():
  with pytest.raises(ValueError, match="fewer than one global batch"):
    make_train_loader(_source(4), global_batch=8, seed=0)
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    make_train_loader(_source(), global_batch=8, seed=0, process_count=3)


class Flaky:
  """Records 3 and 4 are corrupt files."""

  def __len__(self):
    return 8

  def __getitem__(self, i):
    if i in (3, 4):
      raise CorruptImageError(f"image {i}.png cannot be decoded")
    return {"x": np.int32(i)}


def test_unreadable_records_are_replaced_by_the_next_readable_and_counted():
  source = SkipUnreadable(Flaky())
  assert source[2] == {"x": 2, "skipped": 0}
  assert source[3] == {"x": 5, "skipped": 2}
  assert source[4] == {"x": 5, "skipped": 1}


def test_a_dataset_of_unreadable_records_is_an_error():
  class Broken:
    def __len__(self):
      return 100

    def __getitem__(self, i):
      raise CorruptImageError("bad")

  with pytest.raises(RuntimeError, match="consecutive records from index 0 are unreadable"):
    SkipUnreadable(Broken())[0]


def test_worker_processes_give_the_batches_of_threads():
  threads = _take(make_train_loader(_source(), global_batch=8, seed=2, num_threads=2), 6)
  workers = _take(make_train_loader(_source(), global_batch=8, seed=2, num_threads=1, worker_count=2), 6)
  assert workers == threads


def test_worker_processes_ignore_ctrl_c_and_keep_reading():
  threads = _take(make_train_loader(_source(), global_batch=8, seed=2, num_threads=2), 10)
  before = set(multiprocessing.active_children())
  it = iter(make_train_loader(_source(), global_batch=8, seed=2, num_threads=1, worker_count=2))
  got = [next(it)["x"].tolist() for _ in range(2)]  # one batch from each worker: both have started
  workers = [p for p in multiprocessing.active_children() if p not in before]  # this loader's workers
  assert len(workers) == 2
  for process in workers:
    os.kill(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the whole process group
  got += [next(it)["x"].tolist() for _ in range(8)]  # more than the read-ahead: the workers make them
  assert got == threads
  assert all(process.is_alive() for process in workers)


# ----------------------------------------------------------------------------- random crops

CROP = 8


def _coordinate_images(n=16, h=11, w=13):
  """n resized-but-uncropped (h, w, 3) uint8 images whose pixel (y, x) of image i reads (y, x, i):
  a crop's first pixel tells where it was cut and from which image."""
  y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  images = np.stack([np.stack([y, x, np.full_like(y, i)], -1) for i in range(n)]).astype(np.uint8)
  return RandomCrop(ArraySource({"image": images, "label": np.arange(n, dtype=np.int32)}), CROP)


def _crops(loader, steps):
  """[(image index, top, left) for each example] of each of `steps` batches."""
  out = []
  for batch in (next(it) for it in [iter(loader)] for _ in range(steps)):
    assert batch["image"].shape[1:] == (CROP, CROP, 3)
    out.append([(int(im[0, 0, 2]), int(im[0, 0, 0]), int(im[0, 0, 1])) for im in batch["image"]])
  return out


def test_random_crops_are_whole_windows_of_the_image_at_every_offset():
  source = _coordinate_images()
  batches = next(iter(make_train_loader(source, global_batch=16, seed=0, num_threads=0)))["image"]
  for crop in batches:
    i, top, left = crop[0, 0, 2], crop[0, 0, 0], crop[0, 0, 1]
    np.testing.assert_array_equal(crop, source[int(i)]["image"][top : top + CROP, left : left + CROP])
  offsets = {
    (t, l)
    for batch in _crops(make_train_loader(source, global_batch=16, seed=0, num_threads=0), 40)
    for _, t, l in batch
  }
  assert offsets == {(t, l) for t in range(11 - CROP + 1) for l in range(13 - CROP + 1)}  # every window drawn


def test_each_epoch_draws_new_crops_of_the_same_images():
  epochs = _crops(make_train_loader(_coordinate_images(), global_batch=16, seed=0, num_threads=0), 2)
  first, second = dict((i, (t, l)) for i, t, l in epochs[0]), dict((i, (t, l)) for i, t, l in epochs[1])
  assert sorted(first) == sorted(second) == list(range(16))
  assert first != second


def test_random_crops_do_not_depend_on_the_process_count_or_the_start_step():
  whole = _crops(make_train_loader(_coordinate_images(), global_batch=8, seed=4, num_threads=2), 6)
  halves = [
    _crops(make_train_loader(_coordinate_images(), global_batch=8, seed=4, process_index=p, process_count=2), 6)
    for p in range(2)
  ]
  assert [halves[0][t] + halves[1][t] for t in range(6)] == whole
  resumed = _crops(make_train_loader(_coordinate_images(), global_batch=8, seed=4, start_step=4), 2)
  assert resumed == whole[4:]


def test_worker_processes_draw_the_crops_of_threads():
  threads = _crops(make_train_loader(_coordinate_images(), global_batch=8, seed=2, num_threads=2), 4)
  workers = _crops(make_train_loader(_coordinate_images(), global_batch=8, seed=2, num_threads=1, worker_count=2), 4)
  assert workers == threads


def test_images_already_at_the_crop_size_pass_the_random_crop_unchanged():
  procedural = ProceduralShapes(8, CROP, seed=0)
  plain = next(iter(make_train_loader(procedural, global_batch=8, seed=0, num_threads=0)))
  cropped = next(iter(make_train_loader(RandomCrop(procedural, CROP), global_batch=8, seed=0, num_threads=0)))
  np.testing.assert_array_equal(cropped["image"], plain["image"])
