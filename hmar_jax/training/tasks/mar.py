"""MAR training (task 'mar'): masked autoregression over continuous KL-VAE tokens with a diffusion loss.

Each step, as LTH14/mar engine_mar.py does without its latent cache: the images (random horizontal
flip, drawn from the step key) are encoded by the frozen KL VAE, a posterior sample is scaled by the
VAE's latent_scale (0.2325 for kl16) and patchified into tokens; MARModel.loss draws random orders
and one mask ratio per batch, runs the MAE encoder/decoder and the diffusion loss over the masked
tokens (the batch repeated diffusion_batch_mul times). The VAE's weights ride in the state's `frozen`
tree (sharded like the rest, never trained; kept with the cache on too, so that a run may switch).

With config.data.latents_cache on (hmar_jax/training/latent_cache.py, official --use_cached) the
batches hold the cached posterior moments of each image and of its flip instead of the image; the
step picks one per example with the flip the image path would draw from the same key, then samples
and scales as above: the same key gives the same tokens either way.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hmar_jax.data.from_config import train_image_source
from hmar_jax.models.mar import patchify, seq_len
from hmar_jax.models.mar_model import PARAMS_KIND, MARModel, save_mar
from hmar_jax.parallel.partitioning import logical_names_tree
from hmar_jax.tokenizer.kl_vae import KLVAE, load_kl_vae, sample_latents
from hmar_jax.training import latent_cache
from hmar_jax.training.task import Task, TrainState
from hmar_jax.training.tasks.next_scale import overlay


def _host_zeros_vae(config) -> KLVAE:
  graphdef, state = nnx.split(nnx.eval_shape(lambda: KLVAE(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state))


def load_tokenizer(config: ml_collections.ConfigDict) -> KLVAE:
  """The frozen KL VAE: config.tokenizer.checkpoint, or (empty) a random one of
  config.tokenizer.config drawn from config.tokenizer.seed (smoke tests only)."""
  t = config.tokenizer
  if t.checkpoint:
    return load_kl_vae(t.checkpoint)
  vae = _host_zeros_vae(t.config)
  graphdef, state = nnx.split(vae)
  rng = np.random.default_rng(int(t.seed))
  state = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype), state)
  return nnx.merge(graphdef, state)


class MARTask(Task):
  """MAR (config.model, family 'mar') over the frozen KL VAE of config.tokenizer."""

  name = "mar"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    super().__init__(config, workdir)
    self.model_config = ml_collections.ConfigDict(config.model.to_dict())
    self.vae = load_tokenizer(config)
    vae_def, vae_state = nnx.split(self.vae)
    self._vae_def = vae_def
    self._vae_host = jax.tree.map(np.asarray, nnx.to_pure_dict(vae_state))
    self._graphdef = nnx.graphdef(nnx.eval_shape(lambda: self.make_model(jax.random.key(0))))
    self.latents_dir = latent_cache.latents_dir(config, workdir)  # '' = encode every step
    self._latents = None
    self.low_res_px = 0  # the side of a low-resolution view the latent cache also holds (0: none)

  # ---------------------------------------------------------------- model
  def make_model(self, key: jax.Array) -> MARModel:
    return MARModel(self.model_config, rngs=nnx.Rngs(params=key))

  def init_variables(self, key, pretrained=None) -> dict:
    model = self.make_model(key)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rest = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
    if pretrained is None:  # shapes only (abstract_state)
      pretrained = {"vae": jax.tree.map(jnp.asarray, self._vae_host), "params": None}
    if pretrained.get("params") is not None:
      params = overlay(params, pretrained["params"], self.config.init_from)
    return {"params": params, "frozen": {"vae": pretrained["vae"]}, "model_vars": rest, "extra": {}}

  def variable_names(self) -> dict:
    abstract = nnx.eval_shape(lambda: self.make_model(jax.random.key(0)))
    return {"params": logical_names_tree(nnx.state(abstract, nnx.Param))}

  def load_pretrained(self) -> dict:
    # The VAE's weights enter the initialisation as arguments (not as constants baked into it).
    out = {"vae": self._vae_host, "params": None}
    if self.config.init_from:
      from hmar_jax.models.mar_model import load_mar  # noqa: PLC0415

      model = load_mar(self.config.init_from, self.model_config)
      out["params"] = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return out

  def model(self, params: Mapping, model_vars: Mapping | None = None) -> MARModel:
    if model_vars:
      return nnx.merge(self._graphdef, params, model_vars)
    return nnx.merge(self._graphdef, params)

  # ---------------------------------------------------------------- step
  def prepare_batch(self, batch, frozen) -> dict:
    if self.latents_dir:  # cached moments (float32 already)
      return dict(batch)
    image = batch["image"]
    if image.dtype == jnp.uint8:  # official ToTensor + Normalize(0.5, 0.5): x / 255 * 2 - 1
      image = image.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    return {"image": image.astype(jnp.float32), "label": batch["label"]}

  def sample_tokens(self, moments: jax.Array, key: jax.Array) -> jax.Array:
    """(B, L, token_dim) tokens of posterior moments (B, h, w, 2C): a sample scaled by latent_scale."""
    latents = sample_latents(moments, key) * self.vae.latent_scale
    return jax.lax.stop_gradient(patchify(latents, int(self.model_config.patch_size)))

  def tokens(self, frozen: Mapping, images: jax.Array, key: jax.Array) -> jax.Array:
    """(B, L, token_dim) tokens of images (B, H, W, 3) in [-1, 1]: a scaled posterior sample."""
    vae = nnx.merge(self._vae_def, frozen["vae"])
    return self.sample_tokens(vae.encode(images), key)

  def flips(self, key: jax.Array, batch_size: int) -> jax.Array:
    """(B,) bool: which examples are flipped left-right (probability 1/2 each; none without data.flip)."""
    if not self.config.data.flip:
      return jnp.zeros((batch_size,), bool)
    return jax.random.bernoulli(key, 0.5, (batch_size,))

  def augment(self, images: jax.Array, key: jax.Array) -> jax.Array:
    """Images (B, H, W, C) each flipped left-right with probability 1/2 (official RandomHorizontalFlip)."""
    if not self.config.data.flip:
      return images
    flip = self.flips(key, images.shape[0])
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)

  @staticmethod
  def pick(batch: Mapping, view: str, flip: jax.Array) -> jax.Array:
    """The cached moments of `view` (B, h, w, 2C), those of the flipped image where flip (B,) is set
    (official CachedFolder: moments_flip with probability 1/2)."""
    return jnp.where(flip[:, None, None, None], batch[f"{view}_flip"], batch[view])

  def batch_tokens(self, frozen: Mapping, batch: Mapping, k_flip: jax.Array, k_vae: jax.Array) -> jax.Array:
    """(B, L, token_dim) training tokens of a prepared batch: its images flipped where k_flip draws and
    encoded, or (latent cache on) its cached moments picked with the same flips; sampled with k_vae."""
    if self.latents_dir:
      flip = self.flips(k_flip, batch["label"].shape[0])
      return self.sample_tokens(self.pick(batch, "moments", flip), k_vae)
    return self.tokens(frozen, self.augment(batch["image"], k_flip), k_vae)

  def loss(self, params, state: TrainState, batch, key):
    k_flip, k_vae, k_loss = jax.random.split(key, 3)
    tokens = self.batch_tokens(state.frozen, batch, k_flip, k_vae)
    loss, metrics = self.model(params, state.model_vars).loss(tokens, batch["label"], k_loss)
    return loss, metrics, {}

  # ---------------------------------------------------------------- data
  def latents(self) -> latent_cache.LatentCacheSource:
    """The latent cache (built on first use; collective with several processes)."""
    if self._latents is None:
      self._latents = latent_cache.cached_latents(self.config, self.workdir, self.vae, low_res_px=self.low_res_px)
    return self._latents

  def train_source(self):
    if self.latents_dir:
      return self.latents()
    return train_image_source(self.config.data, int(self.model_config.img_size))

  def example_shapes(self) -> dict[str, tuple[int, ...]]:
    if self.latents_dir:
      return {**latent_cache.view_shapes(self.vae.config, self.low_res_px), "label": ()}
    size = int(self.model_config.img_size)
    return {"image": (size, size, 3), "label": ()}

  def tokens_per_example(self) -> int:
    return seq_len(self.model_config)

  def progress_fields(self) -> tuple[str, ...]:
    return ("loss", "mask_ratio")

  # ---------------------------------------------------------------- end of training
  def final_params(self, host: Mapping) -> dict:
    """The weights to save: the EMA when kept (the official evaluation samples with it)."""
    params = host["ema_params"] if "ema_params" in host else host["params"]
    return dict(params)

  def save_params(self, path: str, params: Mapping, step: int) -> None:
    save_mar(
      path, params, self.model_config, extra_metadata={"kind": PARAMS_KIND, "step": step, "task": self.config.task}
    )

  def write_grid(self, model, path: str, **kwargs) -> str:
    """The samples grid at the end of training; kwargs: classes, per_class and config.sample's settings."""
    from hmar_jax.sample import write_mar_sample_grid  # noqa: PLC0415

    return write_mar_sample_grid(model, self.vae, path, **kwargs)

  def sample_settings(self) -> dict:
    s = self.config.sample
    return dict(
      num_iter=int(s.num_iter),
      cfg=float(s.cfg),
      cfg_schedule=str(s.cfg_schedule),
      temperature=float(s.temperature),
      seed=int(s.seed),
    )

  def finish(self, state: TrainState, host, *, primary: bool) -> dict:
    out = {"params": os.path.join(self.workdir, "params"), "samples": None}
    if not primary:
      return out
    params = self.final_params(host)
    if os.path.exists(out["params"]):
      shutil.rmtree(out["params"])
    self.save_params(out["params"], params, int(host["step"]))
    s = self.config.sample
    if s.grid_at_end:
      out["samples"] = self.write_grid(
        self.model(jax.tree.map(jnp.asarray, params)),
        os.path.join(self.workdir, "samples.png"),
        classes=list(range(min(10, int(self.config.data.num_classes), int(self.model_config.class_num)))),
        per_class=int(s.per_class),
        **self.sample_settings(),
      )
    return out
