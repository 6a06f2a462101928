"""Training the multi-scale VQ tokenizer (VQVAE), VQGAN style.

  python -m hmar_jax.train --config=configs/tokenizer_tiny.py --workdir=runs/tokenizer_tiny

Generator (VQVAE) objective, per step:

  nll    = l1_weight * |x - x_rec| + l2_weight * (x - x_rec)^2 + perceptual_weight * LPIPS(x, x_rec)
  loss   = nll + vq_weight * vq_loss + disc_factor(step) * d_weight * (-mean D(x_rec))

* vq_loss is the official VAR quantizer loss returned by the VQVAE forward: mean over scales of
  beta * mse(sg(f_hat_k), f) (commitment, beta = 0.25) + mse(f_hat_k, sg(f)) (codebook term).
  The decoder sees the straight-through f_hat, so reconstruction gradients reach the encoder.
* Codebook update rule (`config.codebook.rule`):
  - 'gradient' (default, the official VAR rule): the codebook is a parameter trained by AdamW
    through the codebook term (straight-through estimator for the encoder).
  - 'ema': the codebook gets no gradient (its optimiser branch is optax.set_to_zero); after each
    step every code moves to an exponential moving average of the residual vectors assigned to
    it (the area-downsampled residual f - f_hat_{<k} that the nearest-code lookup of scale k
    compares against, pooled over all scales), with Laplace-smoothed counts (`ema_codebook_update`).
    The commitment term still trains the encoder; the codebook term then only trains the phis.
  - dead-code restarts (`dead_code_steps` > 0, with either rule): a code not chosen at any
    scale for that many consecutive steps is re-initialised to a random residual vector of the
    current batch (`restart_dead_codes`); its AdamW moments (gradient rule) or EMA statistics
    are reset with it.
* Perceptual loss (optional): LPIPS with VGG16 features, weights from user files
  (`config.loss.perceptual_weights`, see hmar_jax/tokenizer/perceptual.py); never trained.
* Discriminator (optional): a PatchGAN (NLayerDiscriminator) with its own Adam, hinge loss,
  switched on at `disc.start_step` (before that its loss and gradients are multiplied by 0, like
  taming's adopt_weight). The generator's GAN weight is VQGAN's adaptive weight
  ||grad_W nll|| / ||grad_W g_loss|| (W = the decoder's last conv kernel) times `disc.weight`
  (default), or the fixed `disc.weight` when `disc.adaptive_weight` is False.

State is a dict of plain arrays (pure dicts of the NNX modules' variables + optax states), so
it checkpoints with orbax as is and `train_step` is a pure jitted function of (state, batch, rng).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hmar_jax.tokenizer import losses
from hmar_jax.tokenizer.discriminator import NLayerDiscriminator
from hmar_jax.tokenizer.resize import area_resize
from hmar_jax.tokenizer.vqvae import VQVAE, validate_config

CODEBOOK_PATH = ("quantizer", "embedding", "embedding")
LAST_LAYER_PATH = ("decoder", "conv_out", "kernel")
CODEBOOK_UPDATES = ("gradient", "ema")


# ----------------------------------------------------------------------------- codebook updates

def ema_codebook_update(cluster_size: jax.Array, embed_sum: jax.Array, vectors: jax.Array,
                        indices: jax.Array, *, decay: float, eps: float = 1e-5):
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


def restart_dead_codes(codebook: jax.Array, unused_steps: jax.Array, counts: jax.Array,
                       candidates: jax.Array, rng: jax.Array, *, threshold: int):
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
  """The vectors the quantizer looked up at every scale, and the codes they got.

  For scale k: area_resize(f - f_hat_{<k}, pn_k) (official f_rest; the last scale unresized).
  Returns (vectors (N, C), codes (N,) int32) over all scales, N = B * sum(pn**2). No gradients.
  """
  q = model.quantizer
  f = jax.lax.stop_gradient(f.astype(jnp.float32))
  f_hat = jnp.zeros_like(f)
  vecs, codes = [], []
  last = q.num_scales - 1
  for si, (pn, idx) in enumerate(zip(q.patch_nums, indices)):
    rest = f - f_hat
    z = area_resize(rest, (pn, pn)) if si != last else rest
    vecs.append(z.reshape(-1, z.shape[-1]))
    codes.append(idx.reshape(-1))
    if si != last:
      f_hat, _ = q.update_fhat(si, f_hat, idx)
  return jax.lax.stop_gradient(jnp.concatenate(vecs)), jnp.concatenate(codes).astype(jnp.int32)


# ----------------------------------------------------------------------------- config

def _get(tree: Mapping, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> dict:
  """Returns a copy of nested dict `tree` with `path` set to value (copies only along the path)."""
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def check_config(config) -> None:
  """Raises ValueError naming the first problem of a tokenizer training config (before any compile)."""
  if config.get("task", "tokenizer") != "tokenizer":
    raise ValueError(f"config.task is {config.get('task')!r}, expected 'tokenizer'")
  for section in ("model", "data", "loss", "codebook", "disc", "optim", "train"):
    if section not in config:
      raise ValueError(f"tokenizer config lacks section config.{section} (see configs/tokenizer_tiny.py)")
  arch = validate_config(config.model)
  d, l, c, g, o, t = config.data, config.loss, config.codebook, config.disc, config.optim, config.train
  if d.image_size != arch["image_size"]:
    raise ValueError(f"config.data.image_size {d.image_size} differs from the model's image_size "
                     f"{arch['image_size']} (= patch_nums[-1] * 2**(len(ch_mult) - 1))")
  if d.source not in ("procedural", "folder"):
    raise ValueError(f"config.data.source must be 'procedural' or 'folder', got {d.source!r}")
  if d.source == "folder" and not os.path.isdir(d.get("path", "") or ""):
    raise ValueError(f"config.data.path {d.get('path')!r} is not a directory (needed for source 'folder')")
  for name in ("batch_size", "num_eval_images"):
    if not isinstance(d[name], int) or d[name] < 1:
      raise ValueError(f"config.data.{name} must be a positive int, got {d[name]!r}")
  for name in ("l1_weight", "l2_weight", "vq_weight", "perceptual_weight"):
    if l[name] < 0:
      raise ValueError(f"config.loss.{name} must be >= 0, got {l[name]}")
  if l.l1_weight == 0 and l.l2_weight == 0:
    raise ValueError("config.loss.l1_weight and l2_weight are both 0: no reconstruction loss")
  if l.perceptual_weight > 0:
    files = list(l.get("perceptual_weights", ()) or ())
    if not files:
      raise ValueError("config.loss.perceptual_weight > 0 needs config.loss.perceptual_weights: the LPIPS "
                       "weight file(s) (VGG16 + LPIPS heads, .npz or .pth; nothing is downloaded)")
    if arch["image_size"] < 16:
      raise ValueError(f"the perceptual loss needs images of at least 16 px, got {arch['image_size']}")
  if c.rule not in CODEBOOK_UPDATES:
    raise ValueError(f"config.codebook.rule must be one of {CODEBOOK_UPDATES}, got {c.rule!r}")
  if not 0.0 <= c.ema_decay < 1.0:
    raise ValueError(f"config.codebook.ema_decay must be in [0, 1), got {c.ema_decay}")
  if not isinstance(c.dead_code_steps, int) or c.dead_code_steps < 0:
    raise ValueError(f"config.codebook.dead_code_steps must be an int >= 0 (0: off), got {c.dead_code_steps!r}")
  if g.enabled:
    if g.norm not in ("batch", "group", "none"):
      raise ValueError(f"config.disc.norm must be 'batch', 'group' or 'none', got {g.norm!r}")
    if g.start_step < 0 or g.weight < 0:
      raise ValueError(f"config.disc.start_step and weight must be >= 0, got {g.start_step}, {g.weight}")
    down = 2 ** g.num_layers
    if arch["image_size"] < 2 * down:
      raise ValueError(f"a {g.num_layers}-layer discriminator needs images of at least {2 * down} px, "
                       f"got {arch['image_size']}")
  if o.lr <= 0 or not (0 <= o.b1 < 1 and 0 <= o.b2 < 1) or o.weight_decay < 0:
    raise ValueError(f"config.optim: need lr > 0, betas in [0, 1), weight_decay >= 0; got lr={o.lr}, "
                     f"b1={o.b1}, b2={o.b2}, weight_decay={o.weight_decay}")
  for name in ("num_steps", "log_every", "ckpt_every"):
    if not isinstance(t[name], int) or t[name] < 1:
      raise ValueError(f"config.train.{name} must be a positive int, got {t[name]!r}")


# ----------------------------------------------------------------------------- optimisers

def lr_schedule(optim) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then a cosine to `lr * lr_end_ratio` at `decay_steps`."""
  if optim.decay_steps <= optim.warmup_steps or optim.lr_end_ratio == 1.0:
    if optim.warmup_steps <= 0:
      return optax.constant_schedule(optim.lr)
    return optax.linear_schedule(0.0, optim.lr, optim.warmup_steps)
  return optax.warmup_cosine_decay_schedule(0.0, optim.lr, optim.warmup_steps, optim.decay_steps,
                                            end_value=optim.lr * optim.lr_end_ratio)


def make_optimizer(optim, params: Mapping, *, frozen_paths: tuple[tuple[str, ...], ...] = ()):
  """AdamW(lr schedule, b1, b2, eps, weight_decay on >= 2-D params except the codebook), optional
  global-norm clipping; params at `frozen_paths` get zero updates and no optimiser state."""
  def decays(path, x):
    keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    return x.ndim >= 2 and keys != CODEBOOK_PATH

  wd_mask = jax.tree_util.tree_map_with_path(decays, params)
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(lr_schedule(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=wd_mask))
  tx = optax.chain(*parts)
  if not frozen_paths:
    return tx
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
      in frozen_paths else "train", params)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def make_disc_optimizer(disc) -> optax.GradientTransformation:
  """Adam for the discriminator (taming: the same lr as the autoencoder, betas (0.5, 0.9))."""
  return optax.adamw(disc.lr, b1=disc.b1, b2=disc.b2, weight_decay=disc.weight_decay)


# ----------------------------------------------------------------------------- trainer

@dataclasses.dataclass
class TokenizerTrainer:
  """The static half of tokenizer training: module graphs, optimisers, frozen LPIPS weights.

  Build with `TokenizerTrainer.create(config)` -> (trainer, state). Then
    state, metrics = trainer.train_step(state, batch, rng)     # jitted, pure
    recon = trainer.reconstruct(state, images)                 # tokenize -> decode, clamped
    model = trainer.model(state)                               # a VQVAE holding the state's weights

  state (a dict of arrays, saved whole by the checkpointer): step, params / model_vars (the
  VQVAE's nnx.Param / other variables as pure dicts), opt_state, and when enabled codebook_ema
  {cluster_size (V,), embed_sum (V, C)}, unused_steps (V,), disc {params, vars, opt_state}.
  Training randomness (dead-code restarts) comes only from the `rng` argument; the loop passes
  fold_in(key(config.seed), step), so a resumed run repeats an uninterrupted one bit for bit.
  """
  config: Any
  model_def: Any
  tx: optax.GradientTransformation
  disc_def: Any = None
  disc_tx: optax.GradientTransformation | None = None
  perceptual_def: Any = None
  perceptual_params: Any = None

  @classmethod
  def create(cls, config, *, perceptual=None, rng: int | jax.Array | None = None):
    """Builds the modules and the initial state. `perceptual`: an LPIPS module to use instead of
    loading `config.loss.perceptual_weights` (tests). Raises ValueError on a bad config first."""
    check_config(config)
    seed = config.seed if rng is None else rng
    key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
    trainer = _cached_trainer(config) if perceptual is None else None
    if trainer is None:
      trainer = cls._build(config, perceptual)
    return trainer, trainer._init(key)

  @classmethod
  def _build(cls, config, perceptual):
    config = config.copy_and_resolve_references()   # later edits of the caller's config do not leak in
    g = config.disc
    ema = config.codebook.rule == "ema"
    make_model = lambda k: VQVAE(config.model, rngs=nnx.Rngs(params=k))
    make_disc = lambda k: NLayerDiscriminator(config.model.in_channels, g.base_channels, g.num_layers,
                                              norm=g.norm, rngs=nnx.Rngs(params=k))
    # Graph definitions and shapes from abstract modules (no compute) ...
    model_def, abstract_params, _ = nnx.split(nnx.eval_shape(lambda: make_model(jax.random.key(0))),
                                              nnx.Param, ...)
    abstract_params = nnx.to_pure_dict(abstract_params)
    for path in (CODEBOOK_PATH, LAST_LAYER_PATH):
      try:
        _get(abstract_params, path)
      except (KeyError, TypeError):
        raise ValueError(f"the VQVAE has no parameter {'/'.join(path)}") from None
    tx = make_optimizer(config.optim, abstract_params, frozen_paths=(CODEBOOK_PATH,) if ema else ())
    trainer = cls(config=config, model_def=model_def, tx=tx)
    if g.enabled:
      trainer.disc_def = nnx.split(nnx.eval_shape(lambda: make_disc(jax.random.key(0))), nnx.Param, ...)[0]
      trainer.disc_tx = make_disc_optimizer(g)

    # ... and the initial state in one compiled function (eager init compiles every op separately).
    def init_state(key):
      # Initial weights are drawn with the 'rbg' PRNG seeded from `key`: the same numbers for the
      # same key, and a several times faster compile than threefry for ~100 parameter tensors.
      bits = jax.random.bits(key, (4,), jnp.uint32)
      model_key, disc_key = jax.random.split(jax.random.wrap_key_data(bits, impl="rbg"))
      _, params, model_vars = nnx.split(make_model(model_key), nnx.Param, ...)
      params, model_vars = nnx.to_pure_dict(params), nnx.to_pure_dict(model_vars)
      state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_vars": model_vars,
               "opt_state": tx.init(params)}
      codebook = _get(params, CODEBOOK_PATH)
      if ema:
        # Every code starts counted once at its initial value, so unused codes stay put at first.
        state["codebook_ema"] = {"cluster_size": jnp.ones(codebook.shape[:1], jnp.float32),
                                 "embed_sum": codebook.astype(jnp.float32)}
      if config.codebook.dead_code_steps > 0:
        state["unused_steps"] = jnp.zeros(codebook.shape[:1], jnp.int32)
      if g.enabled:
        _, disc_params, disc_vars = nnx.split(make_disc(disc_key), nnx.Param, ...)
        disc_params = nnx.to_pure_dict(disc_params)
        state["disc"] = {"params": disc_params, "vars": nnx.to_pure_dict(disc_vars),
                         "opt_state": trainer.disc_tx.init(disc_params)}
      return state

    trainer._init = jax.jit(init_state)
    if config.loss.perceptual_weight > 0:
      if perceptual is None:
        from hmar_jax.tokenizer.perceptual import load_lpips
        perceptual = load_lpips(list(config.loss.perceptual_weights))
      p_def, p_params = nnx.split(perceptual, nnx.Param)
      trainer.perceptual_def, trainer.perceptual_params = p_def, nnx.to_pure_dict(p_params)
    trainer._step = jax.jit(trainer._train_step)
    trainer._reconstruct = jax.jit(trainer._reconstruct_fn)
    return _remember_trainer(config, trainer) if perceptual is None else trainer

  # -- public

  def train_step(self, state: dict, batch: Mapping[str, jax.Array], rng: jax.Array):
    """One generator (+ discriminator) update. batch['image']: (B, H, W, 3) float in [-1, 1].

    Returns (new state, metrics: dict of float32 scalars). Pure: the same inputs give the same outputs.
    """
    images = batch["image"]
    size = self.config.model.image_size
    shape = tuple(getattr(images, "shape", ()))
    if shape[1:] != (size, size, self.config.model.in_channels) or len(shape) != 4:
      raise ValueError(f"train_step expects batch['image'] of shape (B, {size}, {size}, "
                       f"{self.config.model.in_channels}), got {shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"batch['image'] must be float in [-1, 1], got {images.dtype}")
    return self._step(state, images, rng, self.perceptual_params)

  def reconstruct(self, state: dict, images: jax.Array) -> jax.Array:
    """images (B, H, W, 3) in [-1, 1] -> tokenize -> decode (B, H, W, 3), clamped to [-1, 1]."""
    return self._reconstruct(state["params"], state["model_vars"], images)

  def model(self, state: dict) -> VQVAE:
    """A VQVAE module carrying the state's parameters (e.g. for `save_vqvae`)."""
    return nnx.merge(self.model_def, state["params"], state["model_vars"])

  # -- jitted bodies

  def _reconstruct_fn(self, params, model_vars, images):
    return nnx.merge(self.model_def, params, model_vars).reconstruct(images)

  def _train_step(self, state, images, rng, perceptual_params):
    cfg = self.config
    lw, g = cfg.loss, cfg.disc
    step = state["step"]
    images = images.astype(jnp.float32)
    params, model_vars = state["params"], state["model_vars"]
    metrics = {}

    def forward(p):
      model = nnx.merge(self.model_def, p, model_vars)
      f = model.encode_features(images, train=True)
      f_hat, vq_loss, indices = model.quantizer(f, train=True)
      recon = model.decoder(model.post_quant_conv(f_hat), train=True)
      new_vars = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
      return (recon, vq_loss), (jax.lax.stop_gradient(f), indices, new_vars)

    (recon, vq_loss), vjp_fn, (f, indices, new_model_vars) = jax.vjp(forward, params, has_aux=True)

    def nll_fn(r):
      l1, l2 = losses.l1_loss(r, images), losses.l2_loss(r, images)
      nll = lw.l1_weight * l1 + lw.l2_weight * l2
      p_loss = jnp.zeros((), jnp.float32)
      if perceptual_params is not None:
        p_loss = jnp.mean(nnx.merge(self.perceptual_def, perceptual_params)(r, images))
        nll = nll + lw.perceptual_weight * p_loss
      return nll, (l1, l2, p_loss)

    (nll, (l1, l2, p_loss)), nll_cot = jax.value_and_grad(nll_fn, has_aux=True)(recon)
    loss = nll + lw.vq_weight * vq_loss
    recon_cot = nll_cot
    metrics.update(l1=l1, mse=l2, perceptual=p_loss, vq_loss=vq_loss, nll=nll)

    if g.enabled:
      disc_state = state["disc"]
      factor = losses.disc_factor(step, g.start_step, g.factor)

      def g_fn(r):  # the generator pass's BatchNorm statistics are not kept
        disc = nnx.merge(self.disc_def, disc_state["params"], disc_state["vars"])
        return losses.hinge_g_loss(disc(r, train=True))

      g_loss, g_cot = jax.value_and_grad(g_fn)(recon)
      if g.adaptive_weight:
        last_layer_grad = lambda cot: _get(vjp_fn((cot, jnp.zeros_like(vq_loss)))[0], LAST_LAYER_PATH)
        d_weight = losses.adaptive_disc_weight(last_layer_grad(nll_cot), last_layer_grad(g_cot)) * g.weight
      else:
        d_weight = jnp.float32(g.weight)
      loss = loss + d_weight * factor * g_loss
      recon_cot = recon_cot + (d_weight * factor) * g_cot
      metrics.update(g_loss=g_loss, d_weight=d_weight, disc_factor=factor)

    grads = vjp_fn((recon_cot, jnp.asarray(lw.vq_weight, vq_loss.dtype)))[0]
    updates, opt_state = self.tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=lr_schedule(cfg.optim)(step).astype(jnp.float32))

    new_state = dict(state, step=step + 1, model_vars=new_model_vars, opt_state=opt_state)
    # -- codebook: EMA update and/or dead-code restarts (from the residuals of this step's lookup).
    codes_all = jnp.concatenate([i.reshape(-1) for i in indices])
    num_codes = _get(params, CODEBOOK_PATH).shape[0]
    counts = jnp.bincount(codes_all, length=num_codes)
    metrics["codebook_usage"] = jnp.mean((counts > 0).astype(jnp.float32)) * 100.0
    if "codebook_ema" in state or "unused_steps" in state:
      vectors, codes = quantized_residuals(nnx.merge(self.model_def, params, model_vars), f, indices)
      codebook = _get(new_params, CODEBOOK_PATH)
      if "codebook_ema" in state:
        size, esum, codebook = ema_codebook_update(
            state["codebook_ema"]["cluster_size"], state["codebook_ema"]["embed_sum"], vectors, codes,
            decay=cfg.codebook.ema_decay, eps=cfg.codebook.ema_eps)
      if "unused_steps" in state:
        codebook, unused, dead = restart_dead_codes(
            codebook, state["unused_steps"], counts, vectors, rng, threshold=cfg.codebook.dead_code_steps)
        new_state["unused_steps"] = unused
        metrics["dead_codes_restarted"] = jnp.sum(dead).astype(jnp.float32)
        if "codebook_ema" in state:
          size, esum = jnp.where(dead, 1.0, size), jnp.where(dead[:, None], codebook, esum)
        else:
          new_state["opt_state"] = _zero_moment_rows(self.tx, new_state["opt_state"], params, dead)
      if "codebook_ema" in state:
        new_state["codebook_ema"] = {"cluster_size": size, "embed_sum": esum}
      new_params = _set(new_params, CODEBOOK_PATH, codebook.astype(_get(params, CODEBOOK_PATH).dtype))
    new_state["params"] = new_params

    if g.enabled:
      recon_sg = jax.lax.stop_gradient(recon)

      def d_fn(dp):
        disc = nnx.merge(self.disc_def, dp, disc_state["vars"])
        logits_real, logits_fake = disc(images, train=True), disc(recon_sg, train=True)
        d_loss = losses.hinge_d_loss(logits_real, logits_fake)
        new_vars = nnx.to_pure_dict(nnx.state(disc, nnx.Not(nnx.Param)))
        return factor * d_loss, (d_loss, jnp.mean(logits_real), jnp.mean(logits_fake), new_vars)

      (_, (d_loss, real_mean, fake_mean, disc_vars)), d_grads = jax.value_and_grad(d_fn, has_aux=True)(
          disc_state["params"])
      d_updates, d_opt = self.disc_tx.update(d_grads, disc_state["opt_state"], disc_state["params"])
      new_state["disc"] = {"params": optax.apply_updates(disc_state["params"], d_updates),
                           "vars": disc_vars, "opt_state": d_opt}
      metrics.update(d_loss=d_loss, logits_real=real_mean, logits_fake=fake_mean)
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


# Trainers (and so their compiled step, init and reconstruct functions) of recently used configs:
# a rerun or resume of the same config in one process does not compile again.
_RECENT_TRAINERS: dict[str, TokenizerTrainer] = {}
_MAX_RECENT_TRAINERS = 4


def _trainer_key(config) -> str:
  files = []
  if config.loss.perceptual_weight > 0:
    files = [(os.path.abspath(p), os.path.getmtime(p), os.path.getsize(p)) if os.path.exists(p) else p
             for p in config.loss.perceptual_weights]
  return json.dumps([config.to_json_best_effort(sort_keys=True), files])


def _cached_trainer(config) -> TokenizerTrainer | None:
  return _RECENT_TRAINERS.get(_trainer_key(config))


def _remember_trainer(config, trainer: TokenizerTrainer) -> TokenizerTrainer:
  _RECENT_TRAINERS[_trainer_key(config)] = trainer
  while len(_RECENT_TRAINERS) > _MAX_RECENT_TRAINERS:
    _RECENT_TRAINERS.pop(next(iter(_RECENT_TRAINERS)))
  return trainer


def _zero_moment_rows(tx, opt_state, params, dead):
  """Zeroes the AdamW moments of restarted codebook rows, so stale momentum does not drag them."""
  is_codebook = jax.tree_util.tree_map_with_path(
      lambda path, _: tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path) == CODEBOOK_PATH, params)

  def f(x, flag):
    if flag and getattr(x, "shape", None) is not None and x.ndim == 2 and x.shape[0] == dead.shape[0]:
      return jnp.where(dead[:, None], jnp.zeros_like(x), x)
    return x

  return optax.tree_utils.tree_map_params(tx, f, opt_state, is_codebook)


# ----------------------------------------------------------------------------- loop

def make_sources(data):
  """(training source, held-out evaluation source) for `config.data`."""
  from hmar_jax import data as data_lib
  if data.source == "procedural":
    train = data_lib.ProceduralShapes(data.num_examples, data.image_size, seed=data.seed,
                                      num_classes=data.num_classes)
    # Another seed renders other images: a held-out set of the same distribution.
    held_out = data_lib.ProceduralShapes(data.num_eval_images, data.image_size, seed=data.seed + 1,
                                         num_classes=data.num_classes)
    return train, held_out
  train = data_lib.ImageFolder(data.path, data.image_size)
  return train, train


def _eval_images(source, n: int) -> np.ndarray:
  from hmar_jax.data import to_model_batch
  records = [source[i % len(source)] for i in range(n)]
  return to_model_batch({"image": np.stack([r["image"] for r in records]),
                         "label": np.stack([r["label"] for r in records])})["image"]


def save_reconstruction_png(path: str, originals: np.ndarray, recons: np.ndarray, per_row: int = 8) -> str:
  """PNG of row pairs: a row of originals, then the row of their reconstructions, and so on.

  originals, recons: (N, H, W, 3) in [-1, 1].
  """
  from hmar_jax.image_grid import save_image_grid
  rows = []
  for start in range(0, len(originals), per_row):
    rows += [originals[start:start + per_row], recons[start:start + per_row]]
  tiles = np.concatenate(rows) * 0.5 + 0.5
  return save_image_grid(path, tiles, nrow=min(per_row, len(originals)))


def _mse(a, b) -> float:
  return float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def train_tokenizer(config, workdir: str) -> dict:
  """Trains the tokenizer described by `config` in `workdir`, resuming from its latest checkpoint.

  Writes workdir/checkpoints/<step> (orbax, every `train.ckpt_every` steps and at the end),
  workdir/metrics.jsonl (every `train.log_every` steps), workdir/tokenizer (the final VQVAE,
  `load_vqvae`-able), workdir/reconstructions.png (held-out originals / reconstructions) and
  workdir/result.json (the returned dict).

  Returns the last logged training metrics plus eval_mse_initial / eval_mse_final (MSE of the
  held-out images' tokenize -> decode reconstructions in [-1, 1] before training and now),
  step and png (path).
  """
  from tqdm.auto import tqdm
  from hmar_jax.checkpoint import TrainCheckpointer
  from hmar_jax.data import make_dataset
  from hmar_jax.tokenizer.vqvae import save_vqvae

  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  train_source, eval_source = make_sources(config.data)
  eval_images = _eval_images(eval_source, config.data.num_eval_images)
  trainer, state = TokenizerTrainer.create(config)
  trainer.model(state).check_images(jnp.asarray(eval_images))   # shape + range, before compiling

  t = config.train
  ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), max_to_keep=t.max_to_keep)
  data_state_dir = os.path.join(workdir, "data_state")
  info_path = os.path.join(workdir, "train_info.json")
  start = ckpt.latest_step() or 0
  dataset_iter = iter(make_dataset(train_source, config.data.batch_size, seed=config.data.seed,
                                   num_threads=config.data.num_threads))
  if start:
    state = ckpt.restore(start, state)
    data_state_path = os.path.join(data_state_dir, f"{start}.json")
    if os.path.exists(data_state_path):
      with open(data_state_path) as f:
        dataset_iter.set_state(json.load(f))
    else:   # checkpoints copied without it: the data order restarts (training itself resumes)
      print(f"train_tokenizer: no {data_state_path}; the data pipeline starts from its beginning")
    info = {}
    if os.path.exists(info_path):
      with open(info_path) as f:
        info = json.load(f)
  else:
    info = {"eval_mse_initial": _mse(trainer.reconstruct(state, eval_images), eval_images)}
    with open(info_path, "w") as f:
      json.dump(info, f)

  key = jax.random.key(config.seed)
  metrics: dict[str, float] = {}
  last_saved = start
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as log, \
      tqdm(total=t.num_steps, initial=start, desc="tokenizer", unit="step", dynamic_ncols=True) as bar:
    tic = time.time()
    for step in range(start, t.num_steps):
      batch = next(dataset_iter)
      state, step_metrics = trainer.train_step(state, batch, jax.random.fold_in(key, step))
      done = step + 1
      if done % t.log_every == 0 or done == t.num_steps:
        metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        metrics["steps_per_s"] = t.log_every / max(time.time() - tic, 1e-9)
        tic = time.time()
        log.write(json.dumps({"step": done, **metrics}) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", mse=f"{metrics['mse']:.4f}",
                        usage=f"{metrics['codebook_usage']:.0f}%")
      if done % t.ckpt_every == 0 or done == t.num_steps:
        ckpt.save(done, state)
        os.makedirs(data_state_dir, exist_ok=True)
        with open(os.path.join(data_state_dir, f"{done}.json"), "w") as f:
          json.dump(dataset_iter.get_state(), f)
        last_saved = done
      bar.update(1)
  ckpt.close()

  recons = np.asarray(trainer.reconstruct(state, eval_images))
  png = save_reconstruction_png(os.path.join(workdir, "reconstructions.png"), eval_images, recons)
  final_dir = os.path.join(workdir, "tokenizer")
  if os.path.exists(final_dir):
    shutil.rmtree(final_dir)
  save_vqvae(final_dir, trainer.model(state), extra_metadata={"step": int(state["step"])})
  result = dict(metrics)
  result.update(info, eval_mse_final=_mse(recons, eval_images), step=int(state["step"]), png=png,
                checkpoint_step=last_saved)
  with open(os.path.join(workdir, "result.json"), "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
  if "eval_mse_initial" in result:
    print(f"tokenizer: held-out reconstruction MSE {result['eval_mse_initial']:.4f} -> "
          f"{result['eval_mse_final']:.4f} after {result['step']} steps; wrote {png} and {final_dir}")
  return result
