"""Training the multi-scale VQ tokenizer (VQVAE), VQGAN style, on the shared trainer.

  python -m hmar_jax.train --config=configs/tokenizer.py:tiny --workdir=runs/tokenizer_tiny

Generator (VQVAE) objective, per step:

  nll    = l1_weight * |x - x_rec| + l2_weight * (x - x_rec)^2 + perceptual_weight * LPIPS(x, x_rec)
  loss   = nll + vq_weight * vq_loss + disc_factor(step) * d_weight * (-mean D(x_rec))

* vq_loss is the official VAR quantizer loss returned by the VQVAE forward: mean over scales of
  beta * mse(sg(f_hat_k), f) (commitment, beta = 0.25) + mse(f_hat_k, sg(f)) (codebook term).
  The decoder sees the straight-through f_hat, so reconstruction gradients reach the encoder.
* Codebook update rule (`config.codebook.rule`):
  - 'gradient' (default, the official VAR rule): the codebook is a parameter trained by AdamW
    through the codebook term (straight-through estimator for the encoder).
  - 'ema': the codebook is held outside the trained parameters (no gradient, no optimiser state);
    after each step every code moves to an exponential moving average of the residual vectors
    assigned to it (the area-downsampled residual f - f_hat_{<k} that the nearest-code lookup of
    scale k compares against, pooled over all scales), with Laplace-smoothed counts.
  - dead-code restarts (`dead_code_steps` > 0, with either rule): a code not chosen at any
    scale for that many consecutive steps is re-initialised to a random residual vector of the
    current batch; its AdamW moments (gradient rule) or EMA statistics are reset with it.
* Perceptual loss (optional): LPIPS with VGG16 features, weights from user files
  (`config.loss.perceptual_weights`, see hmar_jax/tokenizer/perceptual.py); held frozen.
* Discriminator (optional): a PatchGAN (NLayerDiscriminator) with its own Adam, hinge loss,
  switched on at `disc.start_step` (before that its loss and gradients are multiplied by 0, like
  taming's adopt_weight). The generator's GAN weight is VQGAN's adaptive weight
  ||grad_W nll|| / ||grad_W g_loss|| (W = the decoder's last conv kernel) times `disc.weight`
  (default), or the fixed `disc.weight` when `disc.adaptive_weight` is False. Both gradients are
  taken at the last layer only (its input held fixed), which is what they are by definition.

Where the state lives: VQVAE parameters in `params` (minus the codebook under 'ema'); the VQVAE's
other variables (codebook usage) in `model_vars`; the EMA codebook and the LPIPS weights in
`frozen`; codebook EMA statistics, dead-code counters and the discriminator (parameters,
variables, Adam state) in `extra`.
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
from hmar_jax.data.from_config import image_source, train_image_source
from hmar_jax.data.loader import SkipUnreadable
from hmar_jax.data.procedural import ProceduralShapes
from hmar_jax.image_grid import save_image_grid
from hmar_jax.tokenizer import losses
from hmar_jax.tokenizer.discriminator import NLayerDiscriminator
from hmar_jax.tokenizer.perceptual import LPIPS, load_lpips
from hmar_jax.tokenizer.resize import area_resize
from hmar_jax.tokenizer.vqvae import VQVAE, save_vqvae
from hmar_jax.training.task import Task, TrainState
from hmar_jax.training.trees import get_path, merge_trees, set_path, split_tree

CODEBOOK_PATH = ("quantizer", "embedding", "embedding")
CODEBOOK_NAME = "/".join(CODEBOOK_PATH)


# ----------------------------------------------------------------------------- codebook updates


def ema_codebook_update(
  cluster_size: jax.Array,
  embed_sum: jax.Array,
  vectors: jax.Array,
  indices: jax.Array,
  *,
  decay: float,
  eps: float = 1e-5,
):
  """One EMA (k-means-like) codebook step (van den Oord et al. 2017, App. A.1).

  Args:
    cluster_size: (V,) EMA of how many vectors chose each code.
    embed_sum: (V, C) EMA of the sum of the vectors that chose each code.
    vectors: (N, C) the vectors that were quantized; indices: (N,) int, their codes.
    decay: EMA decay in [0, 1); eps: Laplace smoothing of the counts.
  Returns:
    (cluster_size, embed_sum, codebook (V, C)) with codebook = embed_sum / smoothed counts.
  """
  num_codes = cluster_size.shape[0]
  vectors = vectors.astype(jnp.float32)
  counts = jax.ops.segment_sum(jnp.ones_like(indices, jnp.float32), indices, num_codes)
  sums = jax.ops.segment_sum(vectors, indices, num_codes)
  cluster_size = decay * cluster_size + (1.0 - decay) * counts
  embed_sum = decay * embed_sum + (1.0 - decay) * sums
  total = jnp.sum(cluster_size)
  smoothed = (cluster_size + eps) / (total + num_codes * eps) * total
  return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def restart_dead_codes(
  codebook: jax.Array,
  unused_steps: jax.Array,
  counts: jax.Array,
  candidates: jax.Array,
  rng: jax.Array,
  *,
  threshold: int,
):
  """Re-initialises codes unused for `threshold` consecutive steps from random candidates.

  Args:
    codebook: (V, C); unused_steps: (V,) int32 consecutive steps each code went unchosen
      before this one; counts: (V,) how often each code was chosen this step;
    candidates: (N, C) vectors to draw replacements from (this batch's residuals); rng: key.
  Returns:
    (codebook, unused_steps, dead (V,) bool): dead codes replaced and their counters reset.
  """
  unused_steps = jnp.where(counts > 0, 0, unused_steps + 1)
  dead = unused_steps >= threshold
  pick = jax.random.randint(rng, (codebook.shape[0],), 0, candidates.shape[0])
  codebook = jnp.where(dead[:, None], candidates[pick].astype(codebook.dtype), codebook)
  return codebook, jnp.where(dead, 0, unused_steps), dead


def quantized_residuals(model: VQVAE, f: jax.Array, indices) -> tuple[jax.Array, jax.Array]:
  """The vectors the quantizer looked up at every scale, and the codes they got, per example.

  For scale k: area_resize(f - f_hat_{<k}, pn_k) (official f_rest; the last scale unresized).
  Returns (vectors (B, T, C), codes (B, T) int32), T = sum(pn**2). No gradients.
  """
  q = model.quantizer
  f = jax.lax.stop_gradient(f.astype(jnp.float32))
  b = f.shape[0]
  f_hat = jnp.zeros_like(f)
  vecs, codes = [], []
  last = q.num_scales - 1
  for si, (pn, idx) in enumerate(zip(q.patch_nums, indices, strict=True)):
    rest = f - f_hat
    z = area_resize(rest, (pn, pn)) if si != last else rest
    vecs.append(z.reshape(b, -1, z.shape[-1]))
    codes.append(idx.reshape(b, -1))
    if si != last:
      f_hat, _ = q.update_fhat(si, f_hat, idx)
  return jax.lax.stop_gradient(jnp.concatenate(vecs, axis=1)), jnp.concatenate(codes, axis=1).astype(jnp.int32)


def zero_moment_rows(tx, opt_state, params, dead: jax.Array):
  """Zeroes the AdamW moments of restarted codebook rows, so stale momentum does not drag them."""
  is_codebook = jax.tree_util.tree_map_with_path(
    lambda path, _: tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path) == CODEBOOK_PATH, params
  )

  def f(x, flag):
    if flag and getattr(x, "shape", None) is not None and x.ndim == 2 and x.shape[0] == dead.shape[0]:
      return jnp.where(dead[:, None], jnp.zeros_like(x), x)
    return x

  return optax.tree_utils.tree_map_params(tx, f, opt_state, is_codebook)


def save_reconstruction_png(path: str, originals: np.ndarray, recons: np.ndarray, per_row: int = 8) -> str:
  """PNG of row pairs: a row of originals, then the row of their reconstructions, and so on.

  originals, recons: (N, H, W, 3) in [-1, 1].
  """
  rows = []
  for start in range(0, len(originals), per_row):
    rows += [originals[start : start + per_row], recons[start : start + per_row]]
  tiles = np.concatenate(rows) * 0.5 + 0.5
  return save_image_grid(path, tiles, nrow=min(per_row, len(originals)))


def _mse(a, b) -> float:
  return float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------- task


class TokenizerTask(Task):
  """The VQVAE of config.model trained on images (config.data)."""

  name = "tokenizer"

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    self.ema_codebook = config.codebook.rule == "ema"
    self.model_def = nnx.graphdef(abstract_module(lambda rngs: VQVAE(config.model, rngs=rngs)))
    g = config.disc
    self.disc_def = None
    if g.enabled:
      self.disc_def = nnx.graphdef(nnx.eval_shape(lambda: self._make_disc(jax.random.key(0))))
      self.disc_tx = optax.adamw(g.lr, b1=g.b1, b2=g.b2, weight_decay=g.weight_decay)  # taming: Adam (0.5, 0.9)
    self.lpips_def = None
    if config.loss.perceptual_weight > 0:
      self.lpips_def = nnx.graphdef(abstract_module(lambda rngs: LPIPS(rngs=rngs)))

  def _make_disc(self, key):
    g = self.config.disc
    return NLayerDiscriminator(
      self.config.model.in_channels, g.base_channels, g.num_layers, norm=g.norm, rngs=nnx.Rngs(params=key)
    )

  # ---------------------------------------------------------------- model
  def _trained(self, name: str) -> bool:
    return not (self.ema_codebook and name == CODEBOOK_NAME)

  def init_variables(self, key, pretrained=None) -> dict:
    # Initial weights are drawn with the 'rbg' PRNG seeded from `key`: the same numbers for the
    # same key, and a several times faster compile than threefry for ~100 parameter tensors.
    bits = jax.random.bits(key, (4,), jnp.uint32)
    model_key, disc_key = jax.random.split(jax.random.wrap_key_data(bits, impl="rbg"))
    _, params, model_vars = nnx.split(VQVAE(self.config.model, rngs=nnx.Rngs(params=model_key)), nnx.Param, ...)
    params, model_vars = nnx.to_pure_dict(params), nnx.to_pure_dict(model_vars)
    trained, held = split_tree(params, self._trained)
    frozen, extra = {}, {}
    if held:
      frozen["model"] = held
    codebook = get_path(params, CODEBOOK_PATH)
    if self.ema_codebook:
      # Every code starts counted once at its initial value, so unused codes stay put at first.
      extra["codebook_ema"] = {
        "cluster_size": jnp.ones(codebook.shape[:1], jnp.float32),
        "embed_sum": codebook.astype(jnp.float32),
      }
    if self.config.codebook.dead_code_steps > 0:
      extra["unused_steps"] = jnp.zeros(codebook.shape[:1], jnp.int32)
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
    return {"params": trained, "frozen": frozen, "model_vars": model_vars, "extra": extra}

  def load_pretrained(self):
    if self.lpips_def is None:
      return None
    module = load_lpips(list(self.config.loss.perceptual_weights))
    return {"lpips": jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))}

  def model(self, params: Mapping, frozen: Mapping, model_vars: Mapping) -> VQVAE:
    return nnx.merge(self.model_def, merge_trees(params, frozen.get("model", {})), model_vars)

  # ---------------------------------------------------------------- step
  def prepare_batch(self, batch, frozen) -> dict:
    image = batch["image"]
    if image.dtype == jnp.uint8:  # official normalize_01_into_pm1: x / 255 * 2 - 1
      image = image.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    return {"image": image.astype(jnp.float32)}

  def _nll(self, recon, images, lpips):
    lw = self.config.loss
    l1, l2 = losses.l1_loss(recon, images), losses.l2_loss(recon, images)
    nll = lw.l1_weight * l1 + lw.l2_weight * l2
    p_loss = jnp.zeros((), jnp.float32)
    if lpips is not None:
      p_loss = jnp.mean(nnx.merge(self.lpips_def, lpips)(recon, images))
      nll = nll + lw.perceptual_weight * p_loss
    return nll, (l1, l2, p_loss)

  def loss(self, params, state: TrainState, batch, key):
    lw, g = self.config.loss, self.config.disc
    images = batch["image"]
    model = self.model(params, state.frozen, state.model_vars)
    f = model.encode_features(images, train=True)
    f_hat, vq_loss, indices = model.quantizer(f, train=True)
    h = model.decoder.features(model.post_quant_conv(f_hat), train=True)
    recon = model.decoder.conv_out(h)
    new_vars = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
    lpips = state.frozen.get("lpips")
    nll, (l1, l2, p_loss) = self._nll(recon, images, lpips)
    loss = nll + lw.vq_weight * vq_loss
    metrics = {"l1": l1, "mse": l2, "perceptual": p_loss, "vq_loss": vq_loss, "nll": nll}
    if g.enabled:
      disc_state = state.extra["disc"]
      factor = losses.disc_factor(state.step, g.start_step, g.factor)

      def g_fn(r):  # built per call (it runs under jax.grad too); its BatchNorm statistics are not kept
        disc = nnx.merge(self.disc_def, disc_state["params"], disc_state["vars"])
        return losses.hinge_g_loss(disc(r, train=True))

      g_loss = g_fn(recon)
      if g.adaptive_weight:
        conv_def, conv_state = nnx.split(model.decoder.conv_out)
        conv_state = nnx.to_pure_dict(conv_state)
        h_sg = jax.lax.stop_gradient(h)

        def last_layer_grad(objective):  # d objective / d W_last, the last layer's input held fixed
          def of_kernel(kernel):
            out = nnx.merge(conv_def, dict(conv_state, kernel=kernel))(h_sg)
            return objective(out)

          return jax.grad(of_kernel)(jax.lax.stop_gradient(conv_state["kernel"]))

        d_weight = (
          losses.adaptive_disc_weight(last_layer_grad(lambda r: self._nll(r, images, lpips)[0]), last_layer_grad(g_fn))
          * g.weight
        )
      else:
        d_weight = jnp.float32(g.weight)
      loss = loss + jax.lax.stop_gradient(d_weight * factor) * g_loss
      metrics.update(g_loss=g_loss, d_weight=d_weight, disc_factor=factor)
    per_example = {"recon": jax.lax.stop_gradient(recon)}
    if "codebook_ema" in state.extra or "unused_steps" in state.extra:
      per_example["vectors"], per_example["codes"] = quantized_residuals(model, f, indices)
    else:
      per_example["codes"] = jnp.concatenate([i.reshape(i.shape[0], -1) for i in indices], axis=1)
    return loss, metrics, {"model_vars": new_vars, "per_example": per_example}

  def after_update(self, state: TrainState, aux, batch, key, tx):
    cfg = self.config
    per = aux["per_example"]
    codes = per["codes"].reshape(-1)
    codebook_tree = state.params if not self.ema_codebook else state.frozen["model"]
    codebook = get_path(codebook_tree, CODEBOOK_PATH)
    counts = jnp.bincount(codes, length=codebook.shape[0])
    metrics = {"codebook_usage": jnp.mean((counts > 0).astype(jnp.float32)) * 100.0}
    extra = dict(state.extra)
    if "vectors" in per:
      vectors = per["vectors"].reshape(-1, per["vectors"].shape[-1])
      new_codebook = codebook
      if self.ema_codebook:
        size, esum, new_codebook = ema_codebook_update(
          extra["codebook_ema"]["cluster_size"],
          extra["codebook_ema"]["embed_sum"],
          vectors,
          codes,
          decay=cfg.codebook.ema_decay,
          eps=cfg.codebook.ema_eps,
        )
      if "unused_steps" in extra:
        new_codebook, unused, dead = restart_dead_codes(
          new_codebook, extra["unused_steps"], counts, vectors, key, threshold=cfg.codebook.dead_code_steps
        )
        extra["unused_steps"] = unused
        metrics["dead_codes_restarted"] = jnp.sum(dead).astype(jnp.float32)
        if self.ema_codebook:
          size, esum = jnp.where(dead, 1.0, size), jnp.where(dead[:, None], new_codebook, esum)
        else:
          state = state.replace(opt_state=zero_moment_rows(tx, state.opt_state, state.params, dead))
      if self.ema_codebook:
        extra["codebook_ema"] = {"cluster_size": size, "embed_sum": esum}
      new_codebook = new_codebook.astype(codebook.dtype)
      if self.ema_codebook:
        state = state.replace(
          frozen=dict(state.frozen, model=set_path(state.frozen["model"], CODEBOOK_PATH, new_codebook))
        )
      else:
        state = state.replace(params=set_path(state.params, CODEBOOK_PATH, new_codebook))
    if self.disc_def is not None:
      g = cfg.disc
      disc_state = extra["disc"]
      factor = losses.disc_factor(state.step - 1, g.start_step, g.factor)
      images, recon = batch["image"], per["recon"]

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
      metrics.update(d_loss=d_loss, logits_real=real_mean, logits_fake=fake_mean)
    return state.replace(extra=extra), metrics

  # ---------------------------------------------------------------- data
  def train_source(self):
    """The training images with the config.data.augment transform (official: random crop)."""
    return train_image_source(self.config.data, int(self.config.model.image_size))

  def _held_out_source(self):
    d = self.config.data
    size = int(self.config.model.image_size)
    if d.source == "procedural":
      # Another seed renders other images: a held-out set of the same distribution.
      return ProceduralShapes(int(d.num_eval_images), size, seed=int(d.seed) + 1, num_classes=int(d.num_classes))
    return image_source(d, size, crop="center")  # the first training images, as evaluation sees them

  def eval_images(self) -> np.ndarray:
    """(N, H, W, 3) float32 in [-1, 1]: the held-out images reconstructed for the PNG and eval MSE."""
    source = SkipUnreadable(self._held_out_source())
    n = int(self.config.data.num_eval_images)
    u8 = np.stack([source[i % len(source)]["image"] for i in range(n)])
    return u8.astype(np.float32) * np.float32(2 / 255) - np.float32(1)

  def example_shapes(self) -> dict[str, tuple[int, ...]]:
    size = int(self.config.model.image_size)
    return {"image": (size, size, int(self.config.model.in_channels))}

  def progress_fields(self) -> tuple[str, ...]:
    return ("mse", "codebook_usage")

  def tokens_per_example(self) -> int:
    return int(self.config.model.image_size) ** 2  # pixels

  # ---------------------------------------------------------------- evaluation and outputs
  def _host_model(self, host: Mapping) -> VQVAE:
    return self.model(
      jax.tree.map(jnp.asarray, host["params"]),
      jax.tree.map(jnp.asarray, host["frozen"]),
      jax.tree.map(jnp.asarray, host["model_vars"]),
    )

  def _reconstruct(self, model: VQVAE, images: np.ndarray) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s).reconstruct(x))(state, jnp.asarray(images)))

  def begin(self, state, *, fresh, gather) -> None:
    info_path = os.path.join(self.workdir, "train_info.json")
    if not fresh and os.path.exists(info_path):
      return
    host = gather(state)
    if jax.process_index() != 0:
      return
    images = self.eval_images()
    model = self._host_model(host)
    model.check_images(jnp.asarray(images))  # shape + range, named, before the long run
    info = {"eval_mse_initial": _mse(self._reconstruct(model, images), images)}
    with open(info_path, "w") as f:
      json.dump(info, f)

  def finish(self, state, host, *, primary: bool) -> dict:
    out: dict = {"tokenizer": os.path.join(self.workdir, "tokenizer")}
    if not primary:
      return out
    model = self._host_model(host)
    images = self.eval_images()
    recons = self._reconstruct(model, images)
    out["png"] = save_reconstruction_png(os.path.join(self.workdir, "reconstructions.png"), images, recons)
    if os.path.exists(out["tokenizer"]):
      shutil.rmtree(out["tokenizer"])
    save_vqvae(out["tokenizer"], model, extra_metadata={"step": int(host["step"])})
    info_path = os.path.join(self.workdir, "train_info.json")
    if os.path.exists(info_path):
      with open(info_path) as f:
        out.update(json.load(f))
    out["eval_mse_final"] = _mse(recons, images)
    with open(os.path.join(self.workdir, "result.json"), "w") as f:
      json.dump({k: v for k, v in out.items()}, f, indent=1, sort_keys=True)
    if "eval_mse_initial" in out:
      print(
        f"tokenizer: held-out reconstruction MSE {out['eval_mse_initial']:.4f} -> "
        f"{out['eval_mse_final']:.4f} after {int(host['step'])} steps; wrote {out['png']} and {out['tokenizer']}"
      )
    return out
