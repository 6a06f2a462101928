"""Hi-MAR training (task 'himar'): MAR made hierarchical by low-resolution pivots, both stages in one step.

The official release (HiDream-ai/himar) ships inference only; its training path is rebuilt here from
the model code and engine_mar.py. Each step: the images (random horizontal flip from the step key)
are encoded by the frozen KL VAE at full resolution (the high-resolution tokens) and, downsampled to
cond_scale * vae_stride pixels, at low resolution (the pivots' tokens); both are scaled posterior
samples. HiMARModel.loss runs stage 1 (MAR over the low-resolution tokens, MLP diffusion head) and
stage 2 (the high-resolution tokens given stage 1's features as pivots, DiT diffusion head) and
returns 0.4 x stage 1 + 0.6 x stage 2 (engine_mar.py weighs the model's 2.0 x loss1 and 0.75 x loss2
by 64 / 320 and 256 / 320). The pivot drop schedule follows the epoch, counted from the step.

With config.data.latents_cache on, both views' moments (and their flips) come from the latent cache
(hmar_jax/training/latent_cache.py), the two picked with one flip per example, as the official
SmallCachedFolder does; the same key gives the same tokens as encoding every step.

The official training reads its latent cache only (main_himar.py's uncached dataset yields no
low-resolution view), whose low view is the 256 px centre crop resized by F.interpolate(mode=
'bicubic') without antialiasing (engine_mar.py cache_latents; the random 128 px crop util/loader.py
draws is discarded there). Here the low view is made the same way (latent_cache.low_res_images),
with the cache and without.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hmar_jax.models.himar import low_res_len
from hmar_jax.training.latent_cache import low_res_images
from hmar_jax.training.task import TrainState
from hmar_jax.training.tasks.mar import MARTask


class HiMARTask(MARTask):
  """Hi-MAR (config.model, family 'himar') over the frozen KL VAE of config.tokenizer."""

  name = "himar"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    from hmar_jax.models.himar_model import HiMARModel  # noqa: PLC0415

    self._model_class = HiMARModel
    super().__init__(config, workdir)
    m = self.model_config
    self.low_res_px = int(m.cond_scale) * int(m.vae_stride)

  def make_model(self, key: jax.Array):
    return self._model_class(self.model_config, rngs=nnx.Rngs(params=key))

  def load_pretrained(self) -> dict:
    out = {"vae": self._vae_host, "params": None}
    if self.config.init_from:
      from hmar_jax.models.himar_model import load_himar  # noqa: PLC0415

      model = load_himar(self.config.init_from, self.model_config)
      out["params"] = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return out

  def epoch(self, step: jax.Array) -> jax.Array:
    """The (integer) epoch a step falls in: the pivot drop schedule's clock (official: per epoch)."""
    per_epoch = max(1, self.num_examples() // int(self.config.train.batch_size))
    return jnp.floor(jnp.asarray(step, jnp.float32) / per_epoch)

  def num_examples(self) -> int:
    if not hasattr(self, "_num_examples"):
      self._num_examples = len(self.train_source())
    return self._num_examples

  def low_res_tokens(self, frozen, images: jax.Array, key: jax.Array) -> jax.Array:
    """(B, S, cond_dim) tokens of the images bicubic-resized to cond_scale * vae_stride pixels."""
    return self.check_low_res(self.tokens(frozen, low_res_images(images, self.low_res_px), key))

  def check_low_res(self, tokens: jax.Array) -> jax.Array:
    if tokens.shape[1] != low_res_len(self.model_config):
      raise ValueError(
        f"low-resolution tokens {tokens.shape} do not give cond_scale ** 2 = {low_res_len(self.model_config)}"
      )
    return tokens

  def batch_views(
    self, frozen, batch, k_flip: jax.Array, k_high: jax.Array, k_low: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """(high (B, L, token_dim), low (B, S, cond_dim)) training tokens of a prepared batch: its images
    flipped where k_flip draws, encoded at both resolutions, or (latent cache on) both views' cached
    moments picked with the same flips (official SmallCachedFolder: one flip for both)."""
    if self.latents_dir:
      flip = self.flips(k_flip, batch["label"].shape[0])
      high = self.sample_tokens(self.pick(batch, "moments", flip), k_high)
      return high, self.check_low_res(self.sample_tokens(self.pick(batch, "low_moments", flip), k_low))
    images = self.augment(batch["image"], k_flip)
    return self.tokens(frozen, images, k_high), self.low_res_tokens(frozen, images, k_low)

  def loss(self, params, state: TrainState, batch, key):
    k_flip, k_high, k_low, k_loss = jax.random.split(key, 4)
    high, low = self.batch_views(state.frozen, batch, k_flip, k_high, k_low)
    model = self.model(params, state.model_vars)
    loss, metrics = model.loss(high, low, batch["label"], k_loss, epoch=self.epoch(state.step))
    return loss, metrics, {}

  def progress_fields(self) -> tuple[str, ...]:
    return ("loss_stage1", "loss_stage2")

  def save_params(self, path: str, params, step: int) -> None:
    from hmar_jax.models.himar_model import PARAMS_KIND, save_himar  # noqa: PLC0415

    meta = {"kind": PARAMS_KIND, "step": step, "task": self.config.task}
    save_himar(path, params, self.model_config, extra_metadata=meta)

  def write_grid(self, model, path: str, **kwargs) -> str:
    from hmar_jax.sample import write_himar_sample_grid  # noqa: PLC0415

    return write_himar_sample_grid(model, self.vae, path, **kwargs)

  def sample_settings(self) -> dict:
    return dict(super().sample_settings(), re_cfg=float(self.config.sample.re_cfg))
