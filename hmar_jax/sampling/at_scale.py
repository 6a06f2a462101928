"""Sampling many images (the 50,000 of the FID protocol) over every device and host, resumably.

The images are numbered in class order (`per_class` of each class in `classes`) and cut into global
batches of `batch_size`; batch b holds images [b * batch_size, (b + 1) * batch_size) (the last one
padded, the padding dropped) and is drawn with the key fold_in(key(seed), b). Process p of P draws
batches p, p + P, ...; each batch is split over the process's local devices (the weights
replicated) and written as soon as it is drawn, atomically, to OUT/batches/<b>.npz. A rerun skips
the batches already written, so nothing is drawn twice and an interrupted run resumes. When every
batch is there, process 0 joins them into OUT/samples_<N>x<H>x<W>x3.npz (`arr_0`: uint8 NHWC, the
layout guided-diffusion's evaluator reads; `labels`: the class of each image) and writes a PNG grid
of the first images, and OUT/images/<i>.png per image when asked.

A batch's images depend only on (seed, b, batch_size): the same seed gives the same images on any
number of devices or processes (JAX's threefry bits do not depend on how an array is sharded).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image
from tqdm.auto import tqdm

from hmar_jax.image_grid import save_image_grid
from hmar_jax.parallel import batch_sharding, make_mesh, mesh_rules, replicated

RUN_FILE = "sampling_run.json"


def class_labels(classes: Sequence[int], per_class: int) -> np.ndarray:
  """(len(classes) * per_class,) int32: each class `per_class` times, in the order given."""
  if per_class < 1:
    raise ValueError(f"per_class must be >= 1, got {per_class}")
  return np.repeat(np.asarray(classes, np.int32), per_class)


def batch_path(out_dir: str, b: int) -> str:
  return os.path.join(out_dir, "batches", f"{b:06d}.npz")


def _write_atomically(path: str, **arrays) -> None:
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)  # a batch file is whole or absent


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def sample_to_dir(
  sampler,
  out_dir: str,
  labels: np.ndarray,
  *,
  batch_size: int,
  seed: int,
  write_pngs: bool = False,
  grid_images: int = 64,
  show_progress: bool = True,
  **sample_kwargs,
) -> str | None:
  """Draws one image per entry of `labels` into `out_dir` (see the module docstring).

  Args:
    sampler: hmar_jax.sampling.Sampler or MARSampler (anything with place(sharding) and
      sample(labels, key, **sample_kwargs) -> (B, H, W, 3) images in [0, 1]); labels: (N,) int class
      ids; batch_size: images per global batch (a multiple of the local device count); seed: the
      run's seed; write_pngs: also one PNG per image; grid_images: how many of the first images the
      grid shows; sample_kwargs: as Sampler.sample_indices (cfg, top_k, top_p, mask_schedule,
      mask_cfg) or MARSampler.sample_tokens (num_iter, cfg, cfg_schedule, temperature); recorded
      in OUT/sampling_run.json, so a rerun with other values is refused.
  Returns:
    the path of the joined .npz on process 0 (None on the others). Collective with several processes.
  """
  labels = np.asarray(labels, np.int32)
  devices = jax.local_devices()
  if labels.ndim != 1 or not len(labels):
    raise ValueError(f"labels must be a non-empty (N,) array, got shape {labels.shape}")
  if batch_size < 1 or batch_size % len(devices):
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of the {len(devices)} local devices")
  _check_same_run(out_dir, labels, batch_size, seed, sample_kwargs)
  # The local devices as a (data, 1, 1) mesh: attention kernels run under shard_map over it.
  mesh = make_mesh((len(devices), 1, 1), devices)
  sampler.place(replicated(mesh))
  split = batch_sharding(mesh, 1)
  n = len(labels)
  num_batches = -(-n // batch_size)
  p, count = jax.process_index(), jax.process_count()
  mine = [b for b in range(p, num_batches, count) if not os.path.exists(batch_path(out_dir, b))]
  key = jax.random.key(int(seed))
  bar = tqdm(total=len(mine) * batch_size, desc="sampling", unit="img", dynamic_ncols=True, disable=not show_progress)
  t0, drawn = time.time(), 0
  if mine and hasattr(sampler, "precompile"):  # every program compiled side by side before the first batch
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules("fsdp_tp")):
      sampler.precompile(jax.device_put(np.zeros(batch_size, np.int32), split), **sample_kwargs)
  for b in mine:
    rows = labels[b * batch_size : (b + 1) * batch_size]
    padded = np.concatenate([rows, np.zeros(batch_size - len(rows), np.int32)])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules("fsdp_tp")):
      images = sampler.sample(jax.device_put(padded, split), jax.random.fold_in(key, b), **sample_kwargs)
    u8 = np.round(np.clip(np.asarray(images[: len(rows)]), 0, 1) * 255).astype(np.uint8)
    _write_atomically(batch_path(out_dir, b), images=u8, labels=rows)
    drawn += len(rows)
    bar.update(batch_size)
    bar.set_postfix(img_s=f"{drawn / (time.time() - t0):.1f}")
  bar.close()
  _sync("sampling batches written")
  if p != 0:
    return None
  return join_batches(out_dir, num_batches, n, write_pngs=write_pngs, grid_images=grid_images)


def _check_same_run(out_dir: str, labels: np.ndarray, batch_size: int, seed: int, sample_kwargs: dict) -> None:
  """Records the run's settings in OUT/sampling_run.json, or refuses a rerun with other settings
  (its batches would mix with the ones already written)."""
  settings = {
    "images": len(labels),
    "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
    "batch_size": int(batch_size),
    "seed": int(seed),
    "sampling": {k: str(v) for k, v in sorted(sample_kwargs.items())},
  }
  path = os.path.join(out_dir, RUN_FILE)
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    if before != settings:
      changed = sorted(k for k in settings if before.get(k) != settings[k])
      raise ValueError(
        f"{out_dir} holds batches of a run with other settings ({', '.join(changed)} differ): "
        "use another output folder, or the settings of that run to resume it"
      )
    return
  if jax.process_index() == 0:
    os.makedirs(os.path.join(out_dir, "batches"), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(settings, f, indent=1)
    os.replace(tmp, path)
  _sync("sampling run recorded")
  os.makedirs(os.path.join(out_dir, "batches"), exist_ok=True)


def join_batches(out_dir: str, num_batches: int, n: int, *, write_pngs: bool, grid_images: int) -> str:
  """Joins OUT/batches/*.npz (all must be there) into the ADM-style .npz; writes the grid (and PNGs)."""
  missing = [b for b in range(num_batches) if not os.path.exists(batch_path(out_dir, b))]
  if missing:
    raise RuntimeError(f"batches {missing[:5]}{'...' if len(missing) > 5 else ''} of {out_dir} are missing")
  images, labels = [], []
  for b in range(num_batches):
    with np.load(batch_path(out_dir, b)) as f:
      images.append(f["images"])
      labels.append(f["labels"])
  images, labels = np.concatenate(images), np.concatenate(labels)
  if len(images) != n:
    raise RuntimeError(f"the batches of {out_dir} hold {len(images)} images, not {n} (written with another setting?)")
  path = os.path.join(out_dir, f"samples_{'x'.join(str(d) for d in images.shape)}.npz")
  _write_atomically(path, arr_0=images, labels=labels)
  save_image_grid(os.path.join(out_dir, "grid.png"), images[:grid_images], nrow=8)
  if write_pngs:
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      Image.fromarray(image).save(os.path.join(out_dir, "images", f"{i:06d}_class{int(label)}.png"))
  return path
