"""Next-scale-prediction training of VAR / HMAR (official nsp_trainer.py, trainer.py, train.py).

  python -m hmar_jax.train --config=configs/train_hmar_tiny.py --workdir=runs/hmar

Pipeline: the built-in images are tokenised once by the (frozen) VQVAE and cached in the
workdir (tokens.npz); every step takes a batch of token maps, forms the teacher-forcing
inputs with the tokenizer's quantizer, and runs the pure `train_step(state, batch)`.
Loss: cross entropy per token, weighted per scale ('uniform' = VAR, 'lognorm' / 'equal' =
HMAR), summed over tokens and averaged over the batch (official
`loss.mul(loss_weight).sum(-1).mean()`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hmar_jax.training import loss_weights as loss_weights_lib
from hmar_jax.training import optim
from hmar_jax.training.state import TrainState, create_train_state, cross_entropy, make_train_step

# ----------------------------------------------------------------------------- losses


def scale_slices(patch_nums: Sequence[int]) -> list[tuple[int, int]]:
  bounds = np.cumsum([0] + [int(p) ** 2 for p in patch_nums])
  return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def nsp_metrics(logits: jax.Array, targets: jax.Array, patch_nums: Sequence[int]) -> dict:
  """Official logging: mean / last-scale CE and accuracy (%), and CE per scale."""
  ce = cross_entropy(logits, targets)
  hit = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  tail = int(patch_nums[-1]) ** 2
  return {"ce_mean": ce.mean(), "ce_tail": ce[:, -tail:].mean(), "acc_mean": 100 * hit.mean(),
          "acc_tail": 100 * hit[:, -tail:].mean(),
          "ce_per_scale": jnp.stack([ce[:, a:b].mean() for a, b in scale_slices(patch_nums)])}


def nsp_loss_fn(patch_nums: Sequence[int], weighting: str = "lognorm", label_smoothing: float = 0.0):
  """loss_fn(model, batch, key) for `make_train_step`.

  batch: 'labels' (B,) int32, 'indices' (B, L) int32 targets, 'teacher_inputs' (B, L - first_l, Cvae).
  """
  weights = jnp.asarray(loss_weights_lib.token_loss_weights(patch_nums, weighting))

  def loss_fn(model, batch, key):
    logits = model.nsp_logits(batch["labels"], batch["teacher_inputs"], train=True, key=key)
    ce = cross_entropy(logits, batch["indices"], label_smoothing)
    loss = jnp.mean(jnp.sum(ce * weights, axis=-1))
    return loss, nsp_metrics(jax.lax.stop_gradient(logits), batch["indices"], patch_nums)

  return loss_fn


def make_nsp_train_step(patch_nums: Sequence[int], weighting: str = "lognorm", label_smoothing: float = 0.0,
                        trainable: Any | None = None):
  """The pure step `train_step(state, batch) -> (state, metrics)` (jit it yourself)."""
  return make_train_step(nsp_loss_fn(patch_nums, weighting, label_smoothing), trainable)


def not_mask_branch(name: str) -> bool:
  """Next-scale training leaves an HMAR model's masked-prediction branch untouched."""
  from hmar_jax.models.transformer import MASK_BRANCH
  return name.split("/", 1)[0] not in MASK_BRANCH


# ----------------------------------------------------------------------------- tokenised data


def images_to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]; float images are taken as already in [-1, 1]."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32)


def _encoder(vqvae):
  graphdef, state = nnx.split(vqvae)

  @jax.jit
  def encode(state, x):
    maps = nnx.merge(graphdef, state).encode_indices(x)
    return jnp.concatenate([m.reshape(m.shape[0], -1) for m in maps], axis=1)

  return lambda x: encode(state, x)


def _encode_padded(encode, images: np.ndarray, batch_size: int) -> np.ndarray:
  """Encodes up to batch_size images, padding to one compiled shape."""
  n = images.shape[0]
  if n < batch_size:
    images = np.concatenate([images, np.zeros((batch_size - n,) + images.shape[1:], images.dtype)])
  return np.asarray(encode(jnp.asarray(images)))[:n]


def tokenize_images(vqvae, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """images (N, H, W, 3) (uint8, or float in [-1, 1]) -> flat token maps (N, L) int32, scale by scale."""
  encode = _encoder(vqvae)
  out = [_encode_padded(encode, images_to_model_range(images[i:i + batch_size]), batch_size)
         for i in range(0, images.shape[0], batch_size)]
  return np.concatenate(out).astype(np.int32)


def make_source(data_config: ml_collections.ConfigDict, image_size: int):
  """The grain data source of config.data.source: 'procedural' (built in; num_examples,
  num_classes, seed), 'folder' (path: root/<class>/<images>) or 'tfds' (name, split, data_dir)."""
  kind = data_config.get("source", "procedural")
  if kind == "procedural":
    from hmar_jax.data.procedural import ProceduralShapes
    return ProceduralShapes(int(data_config.num_examples), int(image_size), seed=int(data_config.get("seed", 0)),
                            num_classes=int(data_config.get("num_classes", 10)))
  if kind == "folder":
    from hmar_jax.data.sources import ImageFolder
    return ImageFolder(data_config.path, int(image_size))
  if kind == "tfds":
    from hmar_jax.data.sources import tfds_source
    return tfds_source(data_config.name, data_config.get("split", "train"), int(image_size),
                       data_dir=data_config.get("data_dir", None) or None)
  raise ValueError(f"unknown data.source {kind!r}; expected 'procedural', 'folder' or 'tfds'")


def tokenize_source(vqvae, source, batch_size: int = 64, limit: int | None = None, desc: str = "tokenising"
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Streams a grain source through the tokenizer: (indices (N, L) int32, labels (N,) int32)."""
  from tqdm import tqdm

  from hmar_jax.data.pipeline import make_dataset
  n = len(source) if limit is None else min(int(limit), len(source))
  if n < len(source):
    from hmar_jax.data.procedural import ProceduralShapes
    if not isinstance(source, ProceduralShapes):
      raise ValueError("data.num_examples can only shorten the procedural source")
  encode = _encoder(vqvae)
  ds = make_dataset(source, batch_size, seed=0, shuffle=False, num_epochs=1, drop_remainder=False)
  indices, labels, seen = [], [], 0
  with tqdm(total=n, desc=desc, unit="img", dynamic_ncols=True) as bar:
    for batch in ds:
      take = min(len(batch["label"]), n - seen)
      indices.append(_encode_padded(encode, np.asarray(batch["image"])[:take], batch_size).astype(np.int32))
      labels.append(np.asarray(batch["label"])[:take].astype(np.int32))
      seen += take
      bar.update(take)
      if seen >= n:
        break
  return np.concatenate(indices), np.concatenate(labels)


def cached_tokens(workdir: str, vqvae, data_config: ml_collections.ConfigDict, tokenizer_id: str,
                  batch_size: int = 64) -> dict[str, np.ndarray]:
  """Token maps of the training images, computed once and cached.

  The cache file is data_config.tokens_cache if set (e.g. the next-scale run's, so finetuning
  reuses it), else workdir/tokens.npz. It is keyed by the data config and the tokenizer identity;
  a mismatch recomputes (and rewrites the file).
  """
  data_fields = {k: v for k, v in data_config.to_dict().items() if k != "tokens_cache"}
  key = hashlib.sha1(json.dumps({"data": data_fields, "tokenizer": tokenizer_id},
                                sort_keys=True, default=str).encode()).hexdigest()
  path = data_config.get("tokens_cache", "") or os.path.join(workdir, "tokens.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      if str(f["key"]) == key:
        return {"indices": f["indices"], "labels": f["labels"]}
  source = make_source(data_config, vqvae.image_size)
  limit = data_config.get("num_examples", None)
  indices, labels = tokenize_source(vqvae, source, batch_size, None if limit is None else int(limit))
  tmp = path + ".tmp.npz"
  np.savez(tmp, indices=indices, labels=labels, key=np.asarray(key))
  os.replace(tmp, path)
  return {"indices": indices, "labels": labels}


def batch_iterator(tokens: dict[str, np.ndarray], batch_size: int, seed: int, start_step: int = 0
                   ) -> Iterator[dict[str, np.ndarray]]:
  """Shuffled epochs over the cached tokens; batch t depends only on (seed, t), so runs resume exactly."""
  n = tokens["labels"].shape[0]
  if n < batch_size:
    raise ValueError(f"batch_size {batch_size} exceeds the {n} cached examples (raise data.num_examples)")
  per_epoch = n // batch_size
  step = start_step
  while True:
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    sel = np.sort(perm[i * batch_size:(i + 1) * batch_size])
    yield {"labels": tokens["labels"][sel], "indices": tokens["indices"][sel]}
    step += 1


def split_maps(indices: jax.Array, patch_nums: Sequence[int]) -> list[jax.Array]:
  """(B, L) flat tokens -> [(B, pn, pn)] per scale."""
  return [indices[:, a:b].reshape(-1, p, p) for (a, b), p in zip(scale_slices(patch_nums), patch_nums)]


def make_input_fn(quantizer, *, with_mask_inputs: bool = False) -> Callable[[dict], dict]:
  """Jitted: {'labels', 'indices' (B, L)} -> adds 'teacher_inputs' (and 'mask_inputs')."""
  graphdef, state = nnx.split(quantizer)
  patch_nums = quantizer.patch_nums

  @jax.jit
  def add_inputs(state, batch):
    q = nnx.merge(graphdef, state)
    maps = split_maps(batch["indices"], patch_nums)
    out = dict(batch, teacher_inputs=q.teacher_forcing_inputs(maps))
    if with_mask_inputs:
      out["mask_inputs"] = q.scale_contributions(maps)
    return out

  return lambda batch: add_inputs(state, {k: jnp.asarray(v) for k, v in batch.items()})


# ----------------------------------------------------------------------------- shared loop pieces


def load_tokenizer(config: ml_collections.ConfigDict):
  """The frozen VQVAE named by config.tokenizer (checkpoint dir, or a seeded random init if empty)."""
  from hmar_jax.tokenizer import vqvae as vqvae_lib
  ckpt = config.tokenizer.get("checkpoint", "")
  if ckpt:
    return vqvae_lib.load_vqvae(ckpt), os.path.abspath(ckpt)
  seed = int(config.tokenizer.get("seed", 0))
  return vqvae_lib.VQVAE(config.tokenizer.config, rngs=nnx.Rngs(seed)), f"random-init:{seed}"


def check_tokenizer_matches_model(vqvae, model_config) -> None:
  q = vqvae.quantizer
  problems = []
  if tuple(q.patch_nums) != tuple(model_config.patch_nums):
    problems.append(f"patch_nums {tuple(q.patch_nums)} vs model {tuple(model_config.patch_nums)}")
  if q.vocab_size != model_config.vocab_size:
    problems.append(f"vocab_size {q.vocab_size} vs model {model_config.vocab_size}")
  if q.z_channels != model_config.cvae:
    problems.append(f"Cvae {q.z_channels} vs model cvae {model_config.cvae}")
  if problems:
    raise ValueError("tokenizer and transformer configs disagree: " + "; ".join(problems))


def make_tx(train: ml_collections.ConfigDict, trainable: Callable[[str], bool] | None):
  peak = optim.peak_learning_rate(float(train.base_lr), int(train.batch_size))
  total = int(train.num_steps)
  warmup = int(train.get("warmup_steps", -1))
  if warmup < 0:   # official default: wp = ep / 50, i.e. 2% of training
    warmup = int(round(total * float(train.get("warmup_frac", 0.02))))
  sched = optim.lr_schedule(peak, total, warmup, kind=train.get("lr_schedule", "lin0"),
                            wp0=float(train.get("wp0", 0.005)), wpe=float(train.get("wpe", 0.01)))
  wd = float(train.get("weight_decay", 0.05))
  wd_end = float(train.get("weight_decay_end", wd))
  tx = optim.make_optimizer(learning_rate=sched, weight_decay=optim.wd_schedule(wd, wd_end, total),
                            grad_clip=float(train.get("grad_clip", 2.0)),
                            no_decay_keys=tuple(train.get("no_decay_keys", optim.NO_DECAY_KEYS)),
                            trainable=trainable)
  return tx, sched


def _to_host(metrics: dict) -> dict:
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    out[k] = float(v) if v.ndim == 0 else [round(float(x), 5) for x in v]
  return out


def run_loop(*, state: TrainState, train_step, batches: Iterator[dict], input_fn, num_steps: int,
             workdir: str, lr_fn, log_every: int, checkpoint_every: int, max_to_keep: int,
             desc: str, on_finish: Callable[[TrainState], None] | None = None) -> tuple[TrainState, list[dict]]:
  """Resumable loop: restores workdir/checkpoints, trains to num_steps with a tqdm bar,
  logs metrics (averaged over log_every steps) to workdir/metrics.jsonl, saves periodically."""
  from absl import logging as absl_logging
  from tqdm import tqdm

  from hmar_jax.checkpoint import TrainCheckpointer
  absl_logging.set_verbosity(absl_logging.WARNING)   # orbax logs every save at INFO, drowning the bar

  ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), max_to_keep=max_to_keep)
  start = ckpt.latest_step()
  if start is not None:
    state = state.replace_from_checkpoint(ckpt.restore(start, state.checkpoint_tree()))
  start = int(start or 0)
  step_fn = jax.jit(train_step, donate_argnums=(0,))
  history, window = [], []
  log_path = os.path.join(workdir, "metrics.jsonl")
  bar = tqdm(range(start, num_steps), desc=desc, initial=start, total=num_steps, dynamic_ncols=True)
  t0 = time.time()
  for step in bar:
    batch = input_fn(next(batches))
    state, metrics = step_fn(state, batch)
    window.append(metrics)
    last = step + 1 == num_steps
    if (step + 1) % log_every == 0 or last:
      avg = _to_host(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0), *window))
      avg.update(step=step + 1, lr=float(lr_fn(step)), seconds=round(time.time() - t0, 2))
      history.append(avg)
      window = []
      with open(log_path, "a") as f:
        f.write(json.dumps(avg) + "\n")
      bar.set_postfix(loss=f"{avg['loss']:.4f}", ce=f"{avg.get('ce_mean', avg['loss']):.3f}")
    if (step + 1) % checkpoint_every == 0 or last:
      ckpt.save(step + 1, state.checkpoint_tree())
  ckpt.close()
  if on_finish is not None:
    on_finish(state)
  return state, history


def save_final_params(workdir: str, state: TrainState, config: ml_collections.ConfigDict, name: str = "params") -> str:
  """Writes the trained (EMA if enabled) model as an hmar_jax parameter checkpoint workdir/name."""
  import shutil

  from hmar_jax import checkpoint
  path = os.path.join(workdir, name)
  params = state.ema_params if state.ema_params is not None else state.params
  if os.path.exists(path):
    shutil.rmtree(path)
  return checkpoint.save_params(path, params, metadata={"kind": "hmar_jax.scale_transformer",
                                                        "model": config.model.to_dict(),
                                                        "step": int(state.step)})


def maybe_write_samples(config: ml_collections.ConfigDict, workdir: str, state: TrainState, vqvae) -> str | None:
  """After training, writes workdir/samples.png (one row per class) when config.sample.grid_at_end."""
  s = config.get("sample", None)
  if s is None or not s.get("grid_at_end", False):
    return None
  from hmar_jax.sample import write_sample_grid
  params = state.ema_params if state.ema_params is not None else state.params
  return write_sample_grid(state.model(params), vqvae, os.path.join(workdir, "samples.png"),
                           per_class=int(s.get("per_class", 8)), cfg=float(s.get("cfg", 1.5)),
                           top_k=int(s.get("top_k", 0)), top_p=float(s.get("top_p", 0.0)),
                           mask_schedule=s.get("mask_schedule", "none"), seed=int(s.get("seed", 0)))


# ----------------------------------------------------------------------------- entry point


def build_model(model_config, seed: int):
  from hmar_jax.models.transformer import ScaleTransformer
  return ScaleTransformer(model_config, rngs=nnx.Rngs(seed))


def train_nsp(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Next-scale training (config.task == 'nsp'); resumes from workdir/checkpoints.

  Writes workdir/tokens.npz (cache), metrics.jsonl, checkpoints/, params/ (final weights,
  loadable with hmar_jax.checkpoint.restore_params / the sampler CLI) and, with
  config.sample.grid_at_end, samples.png.
  Returns {'history': [...], 'params': path, 'samples': png path or None}.
  """
  train = config.train
  os.makedirs(workdir, exist_ok=True)
  vqvae, tok_id = load_tokenizer(config)
  check_tokenizer_matches_model(vqvae, config.model)
  patch_nums = tuple(config.model.patch_nums)
  weighting = train.get("loss_weighting", "lognorm" if config.model.pattern == "block_diagonal" else "uniform")
  loss_weights_lib.token_loss_weights(patch_nums, weighting)   # fail early on a bad name
  tokens = cached_tokens(workdir, vqvae, config.data, tok_id)
  model = build_model(config.model, int(train.get("seed", 0)))
  trainable_fn = not_mask_branch
  tx, sched = make_tx(train, trainable_fn)
  state = create_train_state(model, tx, seed=int(train.get("seed", 0)), ema_decay=float(train.get("ema_decay", 0.0)))
  trainable = optim.trainable_mask(state.params, trainable_fn)
  step = make_nsp_train_step(patch_nums, weighting, float(train.get("label_smoothing", 0.0)), trainable)
  from hmar_jax.checkpoint import TrainCheckpointer
  with TrainCheckpointer(os.path.join(workdir, "checkpoints")) as c:
    start = int(c.latest_step() or 0)
  batches = batch_iterator(tokens, int(train.batch_size), int(train.get("seed", 0)), start)
  state, history = run_loop(
      state=state, train_step=step, batches=batches, input_fn=make_input_fn(vqvae.quantizer),
      num_steps=int(train.num_steps), workdir=workdir, lr_fn=sched, log_every=int(train.get("log_every", 50)),
      checkpoint_every=int(train.get("checkpoint_every", 500)), max_to_keep=int(train.get("max_to_keep", 2)),
      desc=f"{config.model.get('kind', 'model')} next-scale")
  path = save_final_params(workdir, state, config)
  return {"history": history, "params": path, "samples": maybe_write_samples(config, workdir, state, vqvae)}
