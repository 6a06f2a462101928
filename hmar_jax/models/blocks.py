"""Transformer blocks of VAR / HMAR: adaLN self-attention blocks and the adaLN before the head.

Official layout (VAR models/basic_var.py, HMAR models/transformer_blocks.py), written for Flax NNX:

* `AdaLNSelfAttn`: x += gamma1 * attn(LN(x) * (1 + scale1) + shift1);
  x += gamma2 * ffn(LN(x) * (1 + scale2) + shift2), where (gamma1, gamma2, scale1, scale2, shift1,
  shift2) = Linear(SiLU(cond)) split in 6 chunks of C (in that order), LN has no affine and eps 1e-6.
* `SelfAttention`: qkv projection without bias plus separate q and v biases (the k bias is zero);
  with `attn_l2_norm`, q and k are L2-normalised and q is multiplied by a learned per-head scale
  exp(min(s, log 100)) (init s = log 4), with logit scale 1; otherwise scale 0.25 / sqrt(head_dim).
* `FFN`: fc1 -> tanh-GELU -> fc2, hidden = round(C * mlp_ratio).
* `AdaLNBeforeHead`: LN(x) * (1 + scale) + shift with (scale, shift) = Linear(SiLU(cond)).

Parameters carry logical axis names (metadata key `out_sharding`, read with
`nnx.get_partition_spec(state)`), mapped to mesh axes by the caller's rules; no model code changes
for sharding. Names used in this package:

  'embed'   model width C (also the conditioning width D = C)
  'mlp'     FFN hidden width 4C
  'heads'   the flattened H * head_dim axis of q / k / v / attention output (heads contiguous),
            and the per-head attention scale (H,)
  'adaln'   the 6C (block) or 2C (head) adaLN modulation outputs
  'vocab'   the token vocabulary V of the heads
  'classes' rows of the class embedding (num_classes + 1)
  'levels'  rows of the level embedding (one per scale)
  'length'  token positions L of the absolute position embedding
  'cvae'    tokenizer feature width Cvae of the word embedding input
  None      not sharded (e.g. the q/k/v selector axis of size 3)

Variables are created with `eager_sharding=False`: creation needs no mesh. The trainer maps the names
to mesh axes (hmar_jax/parallel/partitioning.py); activations are constrained by logical names of
their own ('act_batch', 'act_heads', ...) when a mesh is set, and attention runs under shard_map.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import pallas_kernels
from hmar_jax.abstract import abstract_module
from hmar_jax.parallel.partitioning import attention_in_shard_map, constrain, row_major_on_gpu

# Logical names of the activations (mapped to mesh axes by hmar_jax.parallel.partitioning).
ACT_TOKENS = ("act_batch", "act_length", "act_embed")
ACT_HEADS = ("act_batch", "act_length", "act_heads", None)
ACT_MLP = ("act_batch", "act_length", "act_mlp")

# Names of the activations a remat policy may keep besides matmul outputs (models.transformer
# REMAT_POLICIES): the modulated LayerNorm outputs and the GELU output, i.e. the matmuls' inputs.
MATMUL_INPUT_NAMES = ("attn_in", "ffn_in", "ffn_act")

# official SelfAttention: max_scale_mul = log(100); scale_mul_1H11 initialised to log(4).
MAX_LOG_ATTN_SCALE = math.log(100.0)
INIT_LOG_ATTN_SCALE = math.log(4.0)


def trunc_normal(std: float):
  """torch.nn.init.trunc_normal_(std=std) (cut at the absolute values +-2, not +-2 std)."""

  def init(key, shape, dtype=jnp.float32):
    bound = 2.0 / std
    return (std * jax.random.truncated_normal(key, -bound, bound, shape, jnp.float32)).astype(dtype)

  return init


def partitioned(init, axes: Sequence[str | None]):
  """`init` with logical axis names attached as metadata (no mesh needed at creation)."""
  return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def param(key, init, shape, axes, param_dtype) -> nnx.Param:
  return nnx.Param(init(key, shape, param_dtype), out_sharding=tuple(axes), eager_sharding=False)


def block_list(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.List:
  """n blocks `make(rngs)` builds, as a list of modules (the list layout), drawn together.

  The constructor runs once under vmap over n keys split from `rngs`, so an init program holds one
  block's initialisers with a leading axis of n instead of n copies of them (with an unrolled list,
  MAR-B's state initialisation took 44 s on an H200; on the CPU its init compiled in 6.1 s, now
  3.4 s). Each block's variables and their metadata come from an abstract build of one block; its
  values are row i of the drawn stack. The values differ from n blocks built one after another from
  the same rngs, but are drawn the same way.
  """
  if n == 0:
    return nnx.List([])
  graphdef, abstract = nnx.split(abstract_module(make))

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def draw(rngs):
    return nnx.to_pure_dict(nnx.state(make(rngs)))

  stacked = draw(rngs)
  blocks = []
  for i in range(n):
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x, i=i: x[i], stacked))
    blocks.append(nnx.merge(graphdef, state))
  return nnx.List(blocks)


def scan_block_list(blocks: Sequence[nnx.Module], x, apply, keys: jax.Array | None = None, remat: bool = False):
  """x through `blocks` (modules of one structure, e.g. an nnx.List) as one jax.lax.scan over their
  parameters stacked on the fly: the block is traced and compiled once, whatever the depth.

  apply(block, x, key) -> x, with key one row of `keys` (len(blocks),) or None; remat recomputes
  each block's activations in the backward pass. The parameters stay a list of blocks (their names,
  converters and checkpoints unchanged); the stacking copies the blocks' weights once per call.
  """
  graphdef = nnx.graphdef(blocks[0])
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(block) for block in blocks])

  def body(x, xs):
    return apply(nnx.merge(graphdef, xs["state"]), x, xs.get("key")), None

  if remat:
    body = jax.checkpoint(body, prevent_cse=False)
  xs = {"state": stacked} if keys is None else {"state": stacked, "key": keys}
  x, _ = jax.lax.scan(body, x, xs)
  return x


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine over the last axis, in float32 (as torch autocast does)."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums x over the axes a broadcast of `shape` to x's shape added or stretched."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
  return x.sum(axes, keepdims=True).reshape(shape) if axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def modulated_layer_norm(x: jax.Array, scale: jax.Array, shift: jax.Array, eps: float, dtype) -> jax.Array:
  """(layer_norm(x) * (1 + scale) + shift).astype(dtype): x (B, N, C); scale, shift float32
  broadcastable to it (adaLN's (B, 1, C)).

  The gradient is the one autodiff gives, written out so that its two kinds of reduction run as
  separate passes over arrays in their own layout: d scale and d shift sum over the tokens, d x
  over the channels. Differentiated automatically, XLA's GPU fusion put both into one fusion
  that first copies float32 transposes of the residual stream (a tenth of the HMAR d24 step).
  """
  return (layer_norm(x, eps) * (1 + scale) + shift).astype(dtype)


def _modulated_layer_norm_fwd(x, scale, shift, eps, dtype):
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
  out = ((xf - mean) * rstd * (1 + scale) + shift).astype(dtype)
  return out, (x, mean, rstd, scale, shift)  # scale and shift: (B, 1, C), small


def _modulated_layer_norm_bwd(eps, dtype, res, dy):
  x, mean, rstd, scale, shift = res
  dy = dy.astype(jnp.float32)
  # The parameter gradients read their own copies (the barrier keeps XLA from merging the passes).
  dy_t, x_t = jax.lax.optimization_barrier((dy, x))
  xhat_t = (x_t.astype(jnp.float32) - mean) * rstd
  d_shift = _sum_to_shape(dy_t, shift.shape).astype(shift.dtype)
  d_scale = _sum_to_shape(dy_t * xhat_t, scale.shape).astype(scale.dtype)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  g = dy * (1 + scale)
  dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
  return dx.astype(x.dtype), d_scale, d_shift


modulated_layer_norm.defvjp(_modulated_layer_norm_fwd, _modulated_layer_norm_bwd)


def l2_normalize(x: jax.Array) -> jax.Array:
  """torch F.normalize(x, dim=-1): x / max(||x||, 1e-12), in float32."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def drop_path(x: jax.Array, rate: float | jax.Array, key: jax.Array | None) -> jax.Array:
  """Stochastic depth (timm DropPath, scale_by_keep): drops whole samples of x (B, ...).

  `rate` may be traced (a scanned stack of blocks carries one rate per block).
  """
  if key is None or (isinstance(rate, (int, float)) and rate <= 0.0):
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


@jax.custom_vjp
def matmul_f32_out(x: jax.Array, w: jax.Array) -> jax.Array:
  """x (..., K) @ w (K, M) -> (..., M) in float32, whatever the inputs' dtype.

  The backward pass multiplies in the inputs' dtype (accumulating in float32), as mixed-precision
  training does: differentiating the plain product would promote its float32 cotangent and run
  both backward products in float32 (TF32 on GPUs, several times slower than bf16).
  """
  return jnp.einsum("...k,km->...m", x, w, preferred_element_type=jnp.float32)


def _matmul_f32_out_fwd(x, w):
  return matmul_f32_out(x, w), (x, w)


def _matmul_f32_out_bwd(res, g):
  x, w = res
  g = g.astype(x.dtype)
  dx = jnp.einsum("...m,km->...k", g, w, preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jnp.einsum("...k,...m->km", x, g, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


matmul_f32_out.defvjp(_matmul_f32_out_fwd, _matmul_f32_out_bwd)


# Float32 logits one prefix-attention chunk may hold: a 1024 px VAR step's last scale would
# otherwise hold batch x heads x 4096 x 10240 of them at once (21 GiB at batch 4 with guidance).
PREFIX_ATTENTION_LOGITS_BYTES = 1 << 29


def prefix_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, scale: float, max_logits_bytes: int = PREFIX_ATTENTION_LOGITS_BYTES
) -> jax.Array:
  """Unmasked attention of q (B, l, H, D) over all of k, v (B, H, m, D) (the KV cache's layout)
  -> (B, l, H, D).

  Used by the KV-cache step, where the keys are exactly the cached prefix (scales <= si), so no
  mask is needed; q and k differ in length, which `pallas_kernels.scale_attention` does not take.
  Queries run in chunks whose logits fit in `max_logits_bytes` (the last one zero-padded).
  """
  b, _, h, _ = q.shape
  rows = max(1, max_logits_bytes // (b * h * k.shape[2] * 4))
  return pallas_kernels.in_query_chunks(lambda qc: _prefix_attention(qc, k, v, scale), q, rows)


def _prefix_attention(q, k, v, scale):
  logits = jnp.einsum("blhd,bhmd->bhlm", q, k, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhlm,bhmd->blhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


class SelfAttention(nnx.Module):
  """Multi-head self-attention with the official q/v biases and optional L2-normalised q, k.

  Params: qkv (C, 3, C) ('embed', None, 'heads') = official mat_qkv.weight (3C, C) transposed;
  q_bias, v_bias (C,) ('heads',); scale_mul (H,) ('heads',) = official scale_mul_1H11 (1, H, 1, 1);
  proj Linear(C, C) kernel ('heads', 'embed').
  """

  def __init__(
    self,
    width: int,
    num_heads: int,
    *,
    attn_l2_norm: bool,
    init_std: float,
    proj_std: float,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = width // num_heads
    self.attn_l2_norm = attn_l2_norm
    self.dtype = dtype
    self.qkv = param(rngs.params(), trunc_normal(init_std), (width, 3, width), ("embed", None, "heads"), param_dtype)
    self.q_bias = param(None, lambda k, s, d: jnp.zeros(s, d), (width,), ("heads",), param_dtype)
    self.v_bias = param(None, lambda k, s, d: jnp.zeros(s, d), (width,), ("heads",), param_dtype)
    if attn_l2_norm:
      self.scale_mul = param(
        None, lambda k, s, d: jnp.full(s, INIT_LOG_ATTN_SCALE, d), (num_heads,), ("heads",), param_dtype
      )
    self.proj = nnx.Linear(
      width,
      width,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=partitioned(trunc_normal(proj_std), ("heads", "embed")),
      bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)),
      rngs=rngs,
    )

  def qkv_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, float]:
    """x (B, N, C) -> q, k, v (B, N, H, Dh) in the compute dtype, and the logit scale."""
    b, n, c = x.shape
    w = self.qkv[...].astype(self.dtype).reshape(c, 3 * c)
    # The product leaves the matmul in the compute dtype (accumulated in float32), as the official
    # F.linear does under autocast; the bias and the L2 norm then run in float32 inside one fusion.
    # A float32 product would write, save and re-read twice the bytes in every block.
    qkv = jnp.einsum("...k,km->...m", x.astype(self.dtype), w).reshape(b, n, 3, c).astype(jnp.float32)
    bias = jnp.stack([self.q_bias[...], jnp.zeros_like(self.q_bias[...]), self.v_bias[...]])
    qkv = (qkv + bias.astype(jnp.float32)).reshape(b, n, 3, self.num_heads, self.head_dim)
    q, k, v = (constrain(qkv[:, :, i], ACT_HEADS) for i in range(3))
    if self.attn_l2_norm:
      head_scale = jnp.exp(jnp.minimum(self.scale_mul[...].astype(jnp.float32), MAX_LOG_ATTN_SCALE))
      q = l2_normalize(q) * head_scale[:, None]
      k = l2_normalize(k)
      scale = 1.0
    else:
      scale = 0.25 / math.sqrt(self.head_dim)  # official SelfAttention without attn_l2_norm
    return q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype), scale

  def output(self, o: jax.Array) -> jax.Array:
    """o (B, N, H, Dh) -> (B, N, C)."""
    b, n = o.shape[:2]
    return self.proj(o.reshape(b, n, -1))

  def __call__(self, x: jax.Array, patch_nums: Sequence[int], pattern: str, implementation: str) -> jax.Array:
    """x (B, N, C), N = sum(p * p for p in patch_nums) -> (B, N, C)."""
    q, k, v, scale = self.qkv_heads(x)

    def attend(q, k, v):
      return pallas_kernels.scale_attention(
        q, k, v, tuple(patch_nums), pattern, scale=scale, implementation=implementation
      )

    # Custom-call kernels cannot be partitioned by XLA: run them per device (batch / heads split).
    o = constrain(attention_in_shard_map(attend, q, k, v), ACT_HEADS)
    return self.output(o)


class FFN(nnx.Module):
  """fc1 (C -> 4C) -> tanh-GELU -> fc2 (4C -> C)."""

  def __init__(self, width: int, hidden: int, *, init_std: float, fc2_std: float, dtype, param_dtype, rngs: nnx.Rngs):
    zeros = nnx.initializers.zeros_init()
    self.fc1 = nnx.Linear(
      width,
      hidden,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=partitioned(trunc_normal(init_std), ("embed", "mlp")),
      bias_init=partitioned(zeros, ("mlp",)),
      rngs=rngs,
    )
    self.fc2 = nnx.Linear(
      hidden,
      width,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=partitioned(trunc_normal(fc2_std), ("mlp", "embed")),
      bias_init=partitioned(zeros, ("embed",)),
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(checkpoint_name(constrain(jax.nn.gelu(self.fc1(x), approximate=True), ACT_MLP), "ffn_act"))


def _ada_lin_init(init_std: float, chunks: int, width: int, gamma_mul: float, other_mul: float):
  """Official init_weights for ada_lin: trunc-normal, gamma chunks (the first 2 of 6) scaled by
  init_adaln_gamma, the rest by init_adaln (kernel layout (D, chunks * C))."""
  base = trunc_normal(init_std)

  def init(key, shape, dtype=jnp.float32):
    w = base(key, shape, jnp.float32)
    mul = np.full((chunks * width,), other_mul, np.float32)
    if chunks == 6:
      mul[: 2 * width] = gamma_mul
    return (w * mul[None, :]).astype(dtype)

  return init


class AdaLNSelfAttn(nnx.Module):
  """One adaLN transformer block (no shared adaLN: the released d16..d30 models use none)."""

  def __init__(
    self,
    *,
    width: int,
    num_heads: int,
    mlp_ratio: float,
    depth: int,
    attn_l2_norm: bool,
    norm_eps: float,
    drop_path: float,
    init_std: float,
    init_adaln: float,
    init_adaln_gamma: float,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    self.width = width
    self.norm_eps = norm_eps
    self.drop_path = drop_path
    self.dtype = dtype
    out_std = init_std / math.sqrt(2 * depth)  # official: proj and fc2 weights / sqrt(2 * depth)
    self.attn = SelfAttention(
      width,
      num_heads,
      attn_l2_norm=attn_l2_norm,
      init_std=init_std,
      proj_std=out_std,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.ffn = FFN(
      width,
      round(width * mlp_ratio),
      init_std=init_std,
      fc2_std=out_std,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.ada_lin = nnx.Linear(
      width,
      6 * width,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=partitioned(_ada_lin_init(init_std, 6, width, init_adaln_gamma, init_adaln), ("embed", "adaln")),
      bias_init=partitioned(nnx.initializers.zeros_init(), ("adaln",)),
      rngs=rngs,
    )

  def modulation(self, cond: jax.Array) -> list[jax.Array]:
    """cond (B, D) -> [gamma1, gamma2, scale1, scale2, shift1, shift2], each (B, 1, C) float32."""
    ada = self.ada_lin(jax.nn.silu(cond.astype(jnp.float32))).astype(jnp.float32)
    ada = ada.reshape(cond.shape[0], 1, 6, self.width)
    return [ada[:, :, i] for i in range(6)]

  def attn_input(self, x, scale1, shift1):
    return checkpoint_name(modulated_layer_norm(x, scale1, shift1, self.norm_eps, self.dtype), "attn_in")

  def finish(self, x, attn_out, mods, key, drop_rate=None):
    """Residual updates after the attention output (B, N, C); shared with the KV-cache path."""
    gamma1, gamma2, _, scale2, _, shift2 = mods
    rate = self.drop_path if drop_rate is None else drop_rate
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    x = x + drop_path((attn_out * gamma1).astype(x.dtype), rate, k1)
    h = checkpoint_name(modulated_layer_norm(x, scale2, shift2, self.norm_eps, self.dtype), "ffn_in")
    x = x + drop_path((self.ffn(h) * gamma2).astype(x.dtype), rate, k2)
    return row_major_on_gpu(constrain(x, ACT_TOKENS), ACT_TOKENS)

  def __call__(
    self,
    x: jax.Array,
    cond: jax.Array,
    *,
    patch_nums: Sequence[int],
    pattern: str,
    implementation: str,
    key: jax.Array | None = None,
    drop_rate: float | jax.Array | None = None,
  ) -> jax.Array:
    """x (B, N, C) compute dtype, cond (B, D) -> (B, N, C). `key` enables drop path (training);
    `drop_rate` overrides the block's own rate (a scanned stack passes each block's)."""
    x = row_major_on_gpu(constrain(x, ACT_TOKENS), ACT_TOKENS)
    mods = self.modulation(cond)
    attn_out = self.attn(self.attn_input(x, mods[2], mods[4]), patch_nums, pattern, implementation)
    return self.finish(x, attn_out, mods, key, drop_rate)

  def cached_call(
    self, x: jax.Array, cond: jax.Array, cache: dict, start: int, layer: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    """KV-cache step: x (B, n, C) are the tokens at positions [start, start + n), attending over
    positions [0, start + n).

    Without `layer`, cache holds this block's 'k', 'v' (B, H, L, Dh) and comes back with the n new
    positions written (in place when it is a donated argument). With `layer` (an int32 scalar, for
    a scanned stack), cache is the whole stack (B, depth, H, L, Dh), read here and never written:
    the result's 'k', 'v' are only the new positions (B, H, n, Dh), which the caller writes for all
    blocks at once (a stack carried through the loop and written in it was copied whole on TPU).
    """
    mods = self.modulation(cond)
    q, k, v, scale = self.attn.qkv_heads(self.attn_input(x, mods[2], mods[4]))
    b, n, h, d = k.shape
    new_k, new_v = (t.swapaxes(1, 2).astype(cache[name].dtype) for t, name in ((k, "k"), (v, "v")))
    if layer is None:
      ck = jax.lax.dynamic_update_slice(cache["k"], new_k, (0, 0, start, 0))
      cv = jax.lax.dynamic_update_slice(cache["v"], new_v, (0, 0, start, 0))
      keys, values, out = ck[:, :, : start + n], cv[:, :, : start + n], {"k": ck, "v": cv}
    else:
      keys, values, out = new_k, new_v, {"k": new_k, "v": new_v}
      if start:

        def prefix(c, new):
          return jnp.concatenate([jax.lax.dynamic_slice(c, (0, layer, 0, 0, 0), (b, 1, h, start, d))[:, 0], new], 2)

        keys, values = prefix(cache["k"], new_k), prefix(cache["v"], new_v)
    o = prefix_attention(q, keys.astype(q.dtype), values.astype(q.dtype), scale)
    return self.finish(x, self.attn.output(o), mods, None), out


class AdaLNBeforeHead(nnx.Module):
  """LN(x) * (1 + scale) + shift, (scale, shift) = ada_lin(SiLU(cond)); computed in float32."""

  def __init__(
    self, width: int, *, norm_eps: float, init_std: float, init_adaln: float, dtype, param_dtype, rngs: nnx.Rngs
  ):
    self.width = width
    self.norm_eps = norm_eps
    self.ada_lin = nnx.Linear(
      width,
      2 * width,
      dtype=jnp.float32,
      param_dtype=param_dtype,
      kernel_init=partitioned(_ada_lin_init(init_std, 2, width, init_adaln, init_adaln), ("embed", "adaln")),
      bias_init=partitioned(nnx.initializers.zeros_init(), ("adaln",)),
      rngs=rngs,
    )

  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    """x (B, N, C), cond (B, D) -> (B, N, C) float32."""
    ada = self.ada_lin(jax.nn.silu(cond.astype(jnp.float32))).reshape(cond.shape[0], 1, 2, self.width)
    return layer_norm(x, self.norm_eps) * (1 + ada[:, :, 0]) + ada[:, :, 1]
