"""Training MAR's KL VAE tokenizer (LDM AutoencoderKL) on the shared trainer, the way the VQ tokenizer is.

  python -m hmar_jax.train --config=configs/kl_tokenizer.py:tiny --workdir=runs/kl_tokenizer_tiny

Generator (VAE) objective, per step, with z = mean + std * eps a posterior sample (eps from the step key):

  nll  = l1_weight * |x - D(z)| + l2_weight * (x - D(z))^2 + perceptual_weight * LPIPS(x, D(z))   (pixel means)
  kl   = 0.5 * sum over (h, w, E) of (mean^2 + var - 1 - logvar), averaged over the batch   (LDM's kl)
  loss = nll + kl_weight * kl / (H * W * C) + disc_factor(step) * d_weight * (-mean D_gan(D(z)))

LDM's LPIPSWithDiscriminator sums the reconstruction terms over pixels before averaging over the batch;
here they are pixel means (the VQ task's losses), so the KL is divided by the number of pixel values
H * W * C: a config's kl_weight (LDM's 1e-6) then weighs the KL against reconstruction exactly as in LDM.
(LDM's learned output log-variance, initialised to 0, is not modelled: it leaves nll unchanged at init.)

The perceptual loss and the PatchGAN (adaptive weight at the decoder's last conv, switched on at
disc.start_step) are the VQ task's (hmar_jax/training/tasks/tokenizer.py), as are the data, the held-out
images and begin(). Writes WORKDIR/tokenizer (load_kl_vae-able), reconstructions.png (originals and
posterior-mean reconstructions) and result.json at the end; the result also holds `latent_std`, the
standard deviation of the held-out posterior means (MAR scales latents by ~1 / std: 0.2325 for kl16).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hmar_jax.abstract import abstract_module
from hmar_jax.tokenizer import losses
from hmar_jax.tokenizer.kl_vae import KLVAE, kl, mode, sample_latents, save_kl_vae
from hmar_jax.tokenizer.perceptual import LPIPS
from hmar_jax.training.task import Task, TrainState
from hmar_jax.training.tasks.tokenizer import TokenizerTask, _mse, save_reconstruction_png


class KLTokenizerTask(TokenizerTask):
  """The KL VAE of config.model trained on images (config.data); no codebook."""

  name = "kl_tokenizer"

  def __init__(self, config, workdir):
    # The VQ task's __init__ builds a VQVAE; the discriminator / LPIPS set-up is the same.
    Task.__init__(self, config, workdir)
    self.ema_codebook = False
    self.model_def = nnx.graphdef(abstract_module(lambda rngs: KLVAE(config.model, rngs=rngs)))
    g = config.disc
    self.disc_def = None
    if g.enabled:
      self.disc_def = nnx.graphdef(nnx.eval_shape(lambda: self._make_disc(jax.random.key(0))))
      self.disc_tx = optax.adamw(g.lr, b1=g.b1, b2=g.b2, weight_decay=g.weight_decay)
    self.lpips_def = None
    if config.loss.perceptual_weight > 0:
      self.lpips_def = nnx.graphdef(abstract_module(lambda rngs: LPIPS(rngs=rngs)))

  # ---------------------------------------------------------------- model
  def init_variables(self, key, pretrained=None) -> dict:
    bits = jax.random.bits(key, (4,), jnp.uint32)  # 'rbg' init: a faster compile (see TokenizerTask)
    model_key, disc_key = jax.random.split(jax.random.wrap_key_data(bits, impl="rbg"))
    _, params, model_vars = nnx.split(KLVAE(self.config.model, rngs=nnx.Rngs(params=model_key)), nnx.Param, ...)
    frozen, extra = {}, {}
    if self.disc_def is not None:
      _, d_params, d_vars = nnx.split(self._make_disc(disc_key), nnx.Param, ...)
      d_params = nnx.to_pure_dict(d_params)
      extra["disc"] = {"params": d_params, "vars": nnx.to_pure_dict(d_vars), "opt_state": self.disc_tx.init(d_params)}
    if self.lpips_def is not None:
      if pretrained is None:  # shapes only (eval_shape): the weights come from load_pretrained
        abstract = nnx.state(abstract_module(lambda rngs: LPIPS(rngs=rngs)), nnx.Param)
        frozen["lpips"] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.to_pure_dict(abstract))
      else:
        frozen["lpips"] = pretrained["lpips"]
    return {
      "params": nnx.to_pure_dict(params),
      "frozen": frozen,
      "model_vars": nnx.to_pure_dict(model_vars),
      "extra": extra,
    }

  def model(self, params: Mapping, frozen: Mapping, model_vars: Mapping) -> KLVAE:
    return nnx.merge(self.model_def, params, model_vars)

  # ---------------------------------------------------------------- step
  def kl_term(self, moments: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(kl: batch mean of the per-image KL sum, its loss term kl_weight * kl / (H * W * C))."""
    kl_mean = jnp.mean(kl(moments))
    return kl_mean, self.config.loss.kl_weight * kl_mean / float(np.prod(images.shape[1:]))

  def loss(self, params, state: TrainState, batch, key):
    g = self.config.disc
    images = batch["image"]
    model = self.model(params, state.frozen, state.model_vars)
    moments = model.encode(images, train=True)
    z = sample_latents(moments, key)
    h = model.decoder.features(model.post_quant_conv(z), train=True)
    recon = model.decoder.conv_out(h)
    new_vars = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
    lpips = state.frozen.get("lpips")
    nll, (l1, l2, p_loss) = self._nll(recon, images, lpips)
    kl_mean, kl_loss = self.kl_term(moments, images)
    loss = nll + kl_loss
    metrics = {"l1": l1, "mse": l2, "perceptual": p_loss, "kl": kl_mean, "nll": nll}
    if g.enabled:
      g_term, more = self._gan_generator_term(model, h, recon, images, lpips, state)
      loss = loss + g_term
      metrics.update(more)
    per_example = {"recon": jax.lax.stop_gradient(recon)}
    return loss, metrics, {"model_vars": new_vars, "per_example": per_example}

  def _gan_generator_term(self, model, h, recon, images, lpips, state):
    """disc_factor * d_weight * hinge_g_loss(D(recon)) (gradient through recon only) and its metrics.

    The same rule as the VQ task: d_weight is VQGAN's (and LDM's) adaptive weight at the decoder's last
    conv, ||grad nll|| / ||grad g_loss|| times disc.weight, or disc.weight when adaptive_weight is off.
    """
    g = self.config.disc
    disc_state = state.extra["disc"]
    factor = losses.disc_factor(state.step, g.start_step, g.factor)

    def g_fn(r):
      disc = nnx.merge(self.disc_def, disc_state["params"], disc_state["vars"])
      return losses.hinge_g_loss(disc(r, train=True))

    g_loss = g_fn(recon)
    if g.adaptive_weight:
      conv_def, conv_state = nnx.split(model.decoder.conv_out)
      conv_state = nnx.to_pure_dict(conv_state)
      h_sg = jax.lax.stop_gradient(h)

      def last_layer_grad(objective):  # d objective / d W_last, the last layer's input held fixed
        def of_kernel(kernel):
          return objective(nnx.merge(conv_def, dict(conv_state, kernel=kernel))(h_sg))

        return jax.grad(of_kernel)(jax.lax.stop_gradient(conv_state["kernel"]))

      nll_grad = last_layer_grad(lambda r: self._nll(r, images, lpips)[0])
      d_weight = losses.adaptive_disc_weight(nll_grad, last_layer_grad(g_fn)) * g.weight
    else:
      d_weight = jnp.float32(g.weight)
    term = jax.lax.stop_gradient(d_weight * factor) * g_loss
    return term, {"g_loss": g_loss, "d_weight": d_weight, "disc_factor": factor}

  def after_update(self, state: TrainState, aux, batch, key, tx):
    """The discriminator's hinge-loss Adam step (when enabled), on the step's reconstructions."""
    if self.disc_def is None:
      return state, {}
    g = self.config.disc
    extra = dict(state.extra)
    disc_state = extra["disc"]
    factor = losses.disc_factor(state.step - 1, g.start_step, g.factor)
    images, recon = batch["image"], aux["per_example"]["recon"]

    def d_fn(dp):
      disc = nnx.merge(self.disc_def, dp, disc_state["vars"])
      logits_real, logits_fake = disc(images, train=True), disc(recon, train=True)
      d_loss = losses.hinge_d_loss(logits_real, logits_fake)
      new_vars = nnx.to_pure_dict(nnx.state(disc, nnx.Not(nnx.Param)))
      return factor * d_loss, (d_loss, jnp.mean(logits_real), jnp.mean(logits_fake), new_vars)

    (_, (d_loss, real_mean, fake_mean, disc_vars)), d_grads = jax.value_and_grad(d_fn, has_aux=True)(
      disc_state["params"]
    )
    d_updates, d_opt = self.disc_tx.update(d_grads, disc_state["opt_state"], disc_state["params"])
    extra["disc"] = {
      "params": optax.apply_updates(disc_state["params"], d_updates),
      "vars": disc_vars,
      "opt_state": d_opt,
    }
    metrics = {"d_loss": d_loss, "logits_real": real_mean, "logits_fake": fake_mean}
    return state.replace(extra=extra), metrics

  def progress_fields(self) -> tuple[str, ...]:
    return ("mse", "kl")

  # ---------------------------------------------------------------- outputs
  def _latent_std(self, model: KLVAE, images: np.ndarray) -> float:
    graphdef, state = nnx.split(model)
    means = jax.jit(lambda s, x: mode(nnx.merge(graphdef, s).encode(x)))(state, jnp.asarray(images))
    return float(np.std(np.asarray(means, np.float64)))

  def finish(self, state, host, *, primary: bool) -> dict:
    out: dict = {"tokenizer": os.path.join(self.workdir, "tokenizer")}
    if not primary:
      return out
    model = self._host_model(host)
    images = self.eval_images()
    recons = self._reconstruct(model, images)
    out["png"] = save_reconstruction_png(os.path.join(self.workdir, "reconstructions.png"), images, recons)
    out["latent_std"] = self._latent_std(model, images)
    if self.config.normalize_latents:  # MAR's tokens with unit spread (kl16's 0.2325 is the same rule)
      model.latent_scale = 1.0 / out["latent_std"]
      model.config = dict(model.config, latent_scale=model.latent_scale)
    out["latent_scale"] = model.latent_scale
    if os.path.exists(out["tokenizer"]):
      shutil.rmtree(out["tokenizer"])
    save_kl_vae(out["tokenizer"], model, extra_metadata={"step": int(host["step"])})
    info_path = os.path.join(self.workdir, "train_info.json")
    if os.path.exists(info_path):
      with open(info_path) as f:
        out.update(json.load(f))
    out["eval_mse_final"] = _mse(recons, images)
    with open(os.path.join(self.workdir, "result.json"), "w") as f:
      json.dump(out, f, indent=1, sort_keys=True)
    if "eval_mse_initial" in out:
      print(
        f"kl_tokenizer: held-out reconstruction MSE {out['eval_mse_initial']:.4f} -> {out['eval_mse_final']:.4f} "
        f"after {int(host['step'])} steps (latent std {out['latent_std']:.4f}); wrote {out['png']} and "
        f"{out['tokenizer']}"
      )
    return out
