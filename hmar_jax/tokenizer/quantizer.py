"""Multi-scale residual vector quantizer (VAR models/quant.py VectorQuantizer2), NHWC.

An f of shape (B, h, w, C) (h = w = patch_nums[-1]) is tokenized scale by scale, small to
large: the residual r (initially f) is area-downsampled to pn x pn, each cell takes its
nearest codebook entry, the looked-up map is bicubic-upsampled back to h x w, passed
through phi_k and added to f_hat (and subtracted from r). f_hat after the last scale is the
quantized latent the decoder sees.

phi_k(h) = (1 - r) h + r conv3x3(h) with r = quant_resi (0.5). With share_quant_resi = 4 there
are 4 convs; scale k of S uses the conv whose tick in linspace(1/12, 11/12, 4) is nearest to
k / (S - 1) (official PhiPartiallyShared).

Token maps are (B, pn, pn) int32 (flat (B, pn**2) is accepted wherever indices go in).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.tokenizer.blocks import conv
from hmar_jax.tokenizer.resize import area_resize, bicubic_resize


class CodebookUsage(nnx.Variable):
  """Non-trainable codebook-usage statistics (official buffer `ema_vocab_hit_SV`)."""


def check_patch_nums(patch_nums: Sequence[int]) -> tuple[int, ...]:
  """Validates a scale layout: >= 2 strictly increasing positive ints."""
  try:
    pns = tuple(int(p) for p in patch_nums)
  except (TypeError, ValueError):
    raise ValueError(f"patch_nums must be a sequence of ints, got {patch_nums!r}") from None
  if len(pns) < 2 or any(p <= 0 for p in pns) or any(a >= b for a, b in zip(pns, pns[1:])):
    raise ValueError(f"patch_nums must be at least 2 strictly increasing positive ints, got {pns}")
  return pns


def phi_ticks(num_phis: int) -> np.ndarray:
  # Official PhiPartiallyShared / PhiNonShared: K == 4 uses linspace(1/3/K, 1-1/3/K, K)
  # (= 1/12 ... 11/12); any other K uses linspace(1/2/K, 1-1/2/K, K).
  k = num_phis
  return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


def phi_assignment(num_scales: int, share_quant_resi: int, default_qresi_counts: int = 0) -> tuple[int, ...]:
  """Which phi conv each scale uses: (S,) indices into the phi list (static, NumPy).

  share_quant_resi == 1: one phi for all; == 0: non-shared, default_qresi_counts or S phis;
  otherwise share_quant_resi phis. Scale si picks argmin |ticks - si / (S - 1)| (first on ties,
  as np.argmin in the official code; computed with the same float64 expressions).
  """
  if share_quant_resi == 1:
    return (0,) * num_scales
  k = (default_qresi_counts or num_scales) if share_quant_resi == 0 else share_quant_resi
  ticks = phi_ticks(k)
  return tuple(int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales))


def num_phis(num_scales: int, share_quant_resi: int, default_qresi_counts: int = 0) -> int:
  if share_quant_resi == 1:
    return 1
  if share_quant_resi == 0:
    return default_qresi_counts or num_scales
  return share_quant_resi


class Phi(nnx.Module):
  """h -> (1 - r) h + r conv3x3(h) (official Phi, an nn.Conv2d subclass)."""

  def __init__(self, channels: int, ratio: float, *, rngs: nnx.Rngs):
    self.ratio = abs(ratio)
    self.conv = conv(channels, channels, 3, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    return h * (1 - self.ratio) + self.conv(h) * self.ratio


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


class MultiScaleQuantizer(nnx.Module):
  """Residual quantizer over the scales `patch_nums`; codebook (vocab_size, Cvae)."""

  def __init__(
    self,
    *,
    vocab_size: int,
    z_channels: int,
    patch_nums: Sequence[int],
    beta: float = 0.25,
    using_znorm: bool = False,
    quant_resi: float = 0.5,
    share_quant_resi: int = 4,
    default_qresi_counts: int = 0,
    codebook_init: float = -1.0,
    rngs: nnx.Rngs,
  ):
    self.patch_nums = check_patch_nums(patch_nums)
    if vocab_size <= 0 or z_channels <= 0:
      raise ValueError(f"vocab_size and z_channels must be positive, got {vocab_size}, {z_channels}")
    self.vocab_size = int(vocab_size)
    self.z_channels = int(z_channels)
    self.beta = float(beta)
    self.using_znorm = bool(using_znorm)
    num_scales = len(self.patch_nums)
    # (S,) static phi index per scale; phis is empty when quant_resi == 0 (official Identity).
    self.uses_phi = abs(quant_resi) > 1e-6
    self.phi_of_scale = phi_assignment(num_scales, share_quant_resi, default_qresi_counts)
    self.share_quant_resi = int(share_quant_resi)
    k = num_phis(num_scales, share_quant_resi, default_qresi_counts)
    self.phis = nnx.List([Phi(z_channels, quant_resi, rngs=rngs) for _ in range(k)] if self.uses_phi else [])
    if codebook_init < 0:  # official eini < 0: uniform(+-|eini| / V)
      bound = abs(codebook_init) / vocab_size
      init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    elif codebook_init > 0:  # official eini > 0: trunc_normal(std=eini)
      init = nnx.initializers.truncated_normal(codebook_init)
    else:  # torch nn.Embedding default: N(0, 1)
      init = nnx.initializers.normal(1.0)
    self.embedding = nnx.Embed(vocab_size, z_channels, embedding_init=init, rngs=rngs)
    # Official buffer ema_vocab_hit_SV (S, V) and its update counter (record_hit, not in the
    # official state_dict).
    self.ema_vocab_hit = CodebookUsage(jnp.zeros((num_scales, vocab_size), jnp.float32))
    self.record_hit = CodebookUsage(jnp.zeros((), jnp.int32))

  # ----------------------------------------------------------------------------- helpers

  @property
  def num_scales(self) -> int:
    return len(self.patch_nums)

  @property
  def side(self) -> int:
    return self.patch_nums[-1]

  def phi(self, si: int, h: jax.Array) -> jax.Array:
    """Scale si's phi_k on (B, h, w, C)."""
    if not self.uses_phi:
      return h
    return self.phis[self.phi_of_scale[si]](h)

  def check_features(self, f: jax.Array) -> None:
    shape = tuple(getattr(f, "shape", ()))
    want = (self.side, self.side, self.z_channels)
    if len(shape) != 4 or shape[1:] != want:
      raise ValueError(
        f"quantizer expects features of shape (B, {want[0]}, {want[1]}, {want[2]}) "
        f"(patch_nums[-1] = {self.side}, Cvae = {self.z_channels}), got {shape}"
      )

  def _check_scale(self, si: int) -> int:
    if not isinstance(si, (int, np.integer)) or not 0 <= si < self.num_scales:
      raise ValueError(f"scale index si must be a Python int in [0, {self.num_scales}), got {si!r}")
    return int(si)

  def _as_map(self, si: int, idx: jax.Array) -> jax.Array:
    """(B, pn, pn) or (B, pn**2) int -> (B, pn, pn), with shape and (if concrete) range checks."""
    pn = self.patch_nums[si]
    shape = tuple(getattr(idx, "shape", ()))
    if len(shape) == 3 and shape[1:] == (pn, pn):
      pass
    elif len(shape) == 2 and shape[1] == pn * pn:
      idx = idx.reshape(shape[0], pn, pn)
    else:
      raise ValueError(f"token map of scale {si} must be (B, {pn}, {pn}) or (B, {pn * pn}), got {shape}")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
      raise ValueError(f"token map of scale {si} must be integer, got {idx.dtype}")
    if _is_concrete(idx) and idx.size:
      host = np.asarray(idx)  # concrete: checked on the host, no tracing
      lo, hi = int(host.min()), int(host.max())
      if lo < 0 or hi >= self.vocab_size:
        raise ValueError(
          f"token map of scale {si} has indices in [{lo}, {hi}], outside the codebook "
          f"[0, {self.vocab_size}) (vocab_size mismatch?)"
        )
    return idx

  def _as_maps(self, indices: Sequence[jax.Array], first: int = 0) -> list[jax.Array]:
    if len(indices) != self.num_scales:
      raise ValueError(
        f"expected {self.num_scales} token maps (one per scale of patch_nums={self.patch_nums}), got {len(indices)}"
      )
    return [self._as_map(si, idx) if si >= first else idx for si, idx in enumerate(indices)]

  def _upsample(self, si: int, h: jax.Array) -> jax.Array:
    return bicubic_resize(h, (self.side, self.side))

  @staticmethod
  def _tokens(x: jax.Array) -> jax.Array:
    """(B, h, w, C) -> (B, h*w, C), row-major like the official view(B, C, -1).transpose(1, 2)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])

  def nearest(self, z: jax.Array) -> jax.Array:
    """(N, C) float -> (N,) int32 nearest codebook entries.

    L2: argmin ||z||^2 + ||e||^2 - 2 z.e (the official expression and summation order);
    z-norm: argmax of cosine similarity. Ties go to the first index, as in torch.
    """
    e = jax.lax.stop_gradient(self.embedding.embedding[...])
    z = jax.lax.stop_gradient(z)
    if self.using_znorm:
      zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
      en = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
      return jnp.argmax(zn @ en.T, axis=-1).astype(jnp.int32)
    d = jnp.sum(z * z, axis=1, keepdims=True) + jnp.sum(e * e, axis=1)
    d = d - 2.0 * (z @ e.T)
    return jnp.argmin(d, axis=-1).astype(jnp.int32)

  # ----------------------------------------------------------------------------- public API

  def embed(self, idx: jax.Array) -> jax.Array:
    """Codebook lookup: (B, pn, pn) int -> (B, pn, pn, C) (any integer shape works)."""
    return self.embedding(idx)

  def _quantize(self, f: jax.Array, *, with_grad: bool):
    """The residual loop. f: (B, h, w, C) float32.

    Returns (indices list of (B, pn, pn) int32, f_hat (B, h, w, C), per-scale f_hat list).
    With with_grad, f_hat carries gradients to the codebook and phis (official forward);
    the residual never carries gradients into f.
    """
    self.check_features(f)
    f_ng = jax.lax.stop_gradient(f.astype(jnp.float32))
    f_rest = f_ng
    f_hat = jnp.zeros_like(f_ng)
    b, _, _, c = f_ng.shape
    indices, f_hats = [], []
    last = self.num_scales - 1
    for si, pn in enumerate(self.patch_nums):
      # Official: the last scale uses the residual as is (it is already pn x pn).
      z = area_resize(f_rest, (pn, pn)) if si != last else f_rest
      idx = self.nearest(z.reshape(-1, c)).reshape(b, pn, pn)
      h = self.embed(idx)
      if not with_grad:
        h = jax.lax.stop_gradient(h)
      if si != last:
        h = self._upsample(si, h)
      h = self.phi(si, h)
      f_hat = f_hat + h
      f_rest = f_rest - jax.lax.stop_gradient(h)
      indices.append(idx)
      f_hats.append(f_hat)
    return indices, f_hat, f_hats

  def encode_indices(self, f: jax.Array) -> list[jax.Array]:
    """Features (B, h, w, C) -> per-scale token maps [(B, pn, pn) int32] (official f_to_idxBl_or_fhat)."""
    return self._quantize(f, with_grad=False)[0]

  def encode(self, f: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """Features (B, h, w, C) -> (token maps, f_hat (B, h, w, C)) in one pass (no gradients)."""
    indices, f_hat, _ = self._quantize(f, with_grad=False)
    return indices, jax.lax.stop_gradient(f_hat)

  def encode_fhats(self, f: jax.Array) -> list[jax.Array]:
    """Features -> f_hat after each scale, [(B, h, w, C)] * S (official to_fhat=True)."""
    return [jax.lax.stop_gradient(x) for x in self._quantize(f, with_grad=False)[2]]

  def __call__(self, f: jax.Array, *, train: bool = False):
    """Training forward (official VectorQuantizer2.forward).

    Args:
      f: (B, h, w, C) encoder features (after quant_conv).
      train: when True, updates the codebook-usage EMA (official schedule: copy on the first
        call, then 0.9 / 0.1 for 100 calls, then 0.99 / 0.01).
    Returns:
      f_hat_st: (B, h, w, C) straight-through f_hat: value f_hat, gradient identity to f.
      vq_loss: scalar, mean over scales of beta * mse(sg(f_hat_k), f) + mse(f_hat_k, sg(f)).
      indices: [(B, pn, pn) int32] per scale.
    """
    f = f.astype(jnp.float32)
    f_ng = jax.lax.stop_gradient(f)
    indices, f_hat, f_hats = self._quantize(f, with_grad=True)
    vq_loss = 0.0
    for fh in f_hats:
      vq_loss = vq_loss + self.beta * jnp.mean((jax.lax.stop_gradient(fh) - f) ** 2) + jnp.mean((fh - f_ng) ** 2)
    vq_loss = vq_loss / self.num_scales
    f_hat_st = (jax.lax.stop_gradient(f_hat) - f_ng) + f
    if train:
      self._record_hits(indices)
    return f_hat_st, vq_loss, indices

  def _record_hits(self, indices: Sequence[jax.Array]) -> None:
    hits = jnp.stack([jnp.bincount(idx.reshape(-1), length=self.vocab_size).astype(jnp.float32) for idx in indices])
    n = self.record_hit[...]
    old = self.ema_vocab_hit[...]
    new = jnp.where(n == 0, hits, jnp.where(n < 100, 0.9 * old + 0.1 * hits, 0.99 * old + 0.01 * hits))
    self.ema_vocab_hit[...] = new
    self.record_hit[...] = n + 1

  def codebook_usage(self, tokens_per_step: int) -> jax.Array:
    """(S,) percent of codes whose usage EMA reaches the official margin.

    Official margin: tokens per step (world size * B * h * w) / V * 0.08.
    """
    margin = tokens_per_step / self.vocab_size * 0.08
    return jnp.mean((self.ema_vocab_hit[...] >= margin).astype(jnp.float32), axis=-1) * 100

  def indices_to_fhat(self, indices: Sequence[jax.Array]) -> jax.Array:
    """Token maps of all scales -> accumulated f_hat (B, h, w, C) (official embed_to_fhat)."""
    maps = self._as_maps(indices)
    f_hat = None
    for si, idx in enumerate(maps):
      h = self.embed(idx)
      if si != self.num_scales - 1:
        h = self._upsample(si, h)
      h = self.phi(si, h)
      f_hat = h if f_hat is None else f_hat + h
    return f_hat

  def teacher_forcing_inputs(self, indices: Sequence[jax.Array]) -> jax.Array:
    """Next-scale-prediction inputs (official idxBl_to_var_input / idxBl_to_ns_input).

    For scale k >= 1: f_hat of scales < k, area-resized to pn_k x pn_k, as tokens.
    Returns (B, L - patch_nums[0]**2, C) float32 (679 x 32 at 256 px). The last scale's map is
    not used (it may be anything of the right shape).
    """
    if len(indices) != self.num_scales:
      raise ValueError(f"expected {self.num_scales} token maps, got {len(indices)}")
    maps = [self._as_map(si, idx) for si, idx in enumerate(indices[:-1])]
    f_hat, out = None, []
    for si in range(self.num_scales - 1):
      h = self.phi(si, self._upsample(si, self.embed(maps[si])))
      f_hat = h if f_hat is None else f_hat + h
      pn = self.patch_nums[si + 1]
      out.append(self._tokens(area_resize(f_hat, (pn, pn))))
    return jnp.concatenate(out, axis=1)

  def scale_contributions(self, indices: Sequence[jax.Array]) -> jax.Array:
    """Each scale's own contribution on its own grid (official idxBl_to_mask_input, unmasked).

    For scale k >= 1: area_resize(phi_k(bicubic_up(embed(idx_k))), pn_k), as tokens.
    Returns (B, L - patch_nums[0]**2, C) float32. The first scale's map is not used.
    """
    if len(indices) != self.num_scales:
      raise ValueError(f"expected {self.num_scales} token maps, got {len(indices)}")
    out = []
    for si in range(1, self.num_scales):
      pn = self.patch_nums[si]
      # Official: bicubic to h x w at every scale (the identity at the last one).
      h = self.phi(si, self._upsample(si, self.embed(self._as_map(si, indices[si]))))
      out.append(self._tokens(area_resize(h, (pn, pn))))
    return jnp.concatenate(out, axis=1)

  def update_fhat(self, si: int, f_hat: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adds scale si's tokens to f_hat (official get_next_autoregressive_input).

    Args:
      si: scale index (Python int).
      f_hat: (B, h, w, C) accumulated latent of scales < si (zeros before scale 0).
      idx: (B, pn, pn) or (B, pn**2) tokens of scale si.
    Returns:
      (f_hat, next_input): the updated f_hat (B, h, w, C), and the next scale's input, f_hat
      area-resized to scale si + 1 as tokens (B, pn_{si+1}**2, C); at the last scale,
      f_hat itself as tokens (B, h*w, C).
    """
    si = self._check_scale(si)
    return self.update_fhat_embedded(si, f_hat, self.embed(self._as_map(si, idx)))

  def update_fhat_embedded(self, si: int, f_hat: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`update_fhat` from an already looked-up (or soft) map h (B, pn, pn, C)."""
    si = self._check_scale(si)
    self.check_features(f_hat)
    if si != self.num_scales - 1:
      f_hat = f_hat + self.phi(si, self._upsample(si, h))  # official: conv after upsample
      pn = self.patch_nums[si + 1]
      return f_hat, self._tokens(area_resize(f_hat, (pn, pn)))
    f_hat = f_hat + self.phi(si, h)
    return f_hat, self._tokens(f_hat)

  def mask_step_inputs(self, si: int, f_hat: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """HMAR masked-prediction inputs at scale si (official get_next_mask_input).

    Args:
      si: scale index; f_hat: (B, h, w, C) of scales < si (not updated here);
      idx: (B, pn, pn) or (B, pn**2) current tokens of scale si.
    Returns:
      (f_hat_at_si, h_at_si), both (B, pn**2, C): f_hat area-resized to scale si, and scale
      si's contribution phi(bicubic_up(embed(idx))) area-resized to scale si.
    """
    si = self._check_scale(si)
    return self.mask_step_inputs_embedded(si, f_hat, self.embed(self._as_map(si, idx)))

  def mask_step_inputs_embedded(self, si: int, f_hat: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    si = self._check_scale(si)
    self.check_features(f_hat)
    pn = self.patch_nums[si]
    h = self.phi(si, self._upsample(si, h))
    return self._tokens(area_resize(f_hat, (pn, pn))), self._tokens(area_resize(h, (pn, pn)))
