"""Loss functions for training the multi-scale VQ tokenizer, VQGAN style.

All losses are means over every element (so they do not depend on batch size or
resolution), computed in float32. Images are NHWC in [-1, 1].

The generator objective assembled in `hmar_jax.training.tasks.tokenizer` is

  l1_weight * |x - x_rec| + l2_weight * (x - x_rec)^2 + perceptual_weight * LPIPS(x, x_rec)
  + vq_weight * vq_loss + disc_factor(step) * d_weight * hinge_g_loss(D(x_rec))

with `vq_loss` the official VAR quantizer loss (commitment beta * mse(sg(f_hat), f) plus
codebook mse(f_hat, sg(f)), averaged over scales), and the discriminator trained on
`hinge_d_loss(D(x), D(sg(x_rec)))`, as in taming-transformers' VQLPIPSWithDiscriminator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l1_loss(recon: jax.Array, target: jax.Array) -> jax.Array:
  """Mean absolute error over all elements. recon, target: same shape. Returns a scalar."""
  return jnp.mean(jnp.abs(recon.astype(jnp.float32) - target.astype(jnp.float32)))


def l2_loss(recon: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over all elements. recon, target: same shape. Returns a scalar."""
  return jnp.mean(jnp.square(recon.astype(jnp.float32) - target.astype(jnp.float32)))


def reconstruction_loss(recon: jax.Array, target: jax.Array, *, l1_weight: float, l2_weight: float) -> jax.Array:
  """l1_weight * L1 + l2_weight * L2; a zero weight skips that term entirely."""
  if l1_weight < 0 or l2_weight < 0 or (l1_weight == 0 and l2_weight == 0):
    raise ValueError(f"reconstruction weights must be >= 0 and not both 0, got l1={l1_weight}, l2={l2_weight}")
  loss = jnp.zeros((), jnp.float32)
  if l1_weight:
    loss = loss + l1_weight * l1_loss(recon, target)
  if l2_weight:
    loss = loss + l2_weight * l2_loss(recon, target)
  return loss


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec)))).

  Same as taming-transformers `hinge_d_loss`. logits_*: any shape (e.g. (B, h, w, 1) patch logits).
  """
  loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
  """Generator side of the hinge GAN: -mean(D(x_rec))."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def disc_factor(step: jax.Array, start_step: int, factor: float = 1.0) -> jax.Array:
  """`factor` once `step >= start_step`, else 0 (taming's adopt_weight). step: int scalar."""
  return jnp.where(step >= start_step, jnp.float32(factor), jnp.float32(0.0))


def adaptive_disc_weight(
  nll_grad: jax.Array, g_grad: jax.Array, *, max_weight: float = 1e4, eps: float = 1e-4
) -> jax.Array:
  """VQGAN's adaptive GAN weight ||d nll / d W_last|| / (||d g_loss / d W_last|| + eps), clipped to [0, max_weight].

  nll_grad, g_grad: gradients of the reconstruction (+ perceptual) loss and of the generator
  GAN loss with respect to the decoder's last layer weight (same shape). The result carries
  no gradient (taming detaches it).
  """
  nll_norm = jnp.linalg.norm(nll_grad.astype(jnp.float32).ravel())
  g_norm = jnp.linalg.norm(g_grad.astype(jnp.float32).ravel())
  return jax.lax.stop_gradient(jnp.clip(nll_norm / (g_norm + eps), 0.0, max_weight))
