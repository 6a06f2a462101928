"""VAR / HMAR scale transformer: next-scale prediction, HMAR masked prediction, per-scale steps.

One module, `ScaleTransformer`, covers both models; `config.model.pattern` switches them:

* 'block_causal' (VAR): a token of scale k attends to the tokens of all scales <= k. Per-scale
  inference uses a KV cache (`init_cache`, `nsp_scale_logits_cached`).
* 'block_diagonal' (HMAR): a token of scale k attends to scale k only; earlier scales enter only
  through the input features (the accumulated reconstruction). The per-scale step
  (`nsp_scale_logits`) runs the blocks on that scale's tokens alone and equals the corresponding
  slice of the full-sequence forward.

HMAR's inference model (official models/hmar.py: base_blocks, ns_blocks, mask_blocks, ns_head,
mask_head, mask_embed) is the same module with `config.model.mask_layers = N > 0`:

  blocks[: depth - N]   shared base blocks           (official base_blocks)
  blocks[depth - N :]   next-scale blocks            (official ns_blocks)
  head_nm, head         next-scale head              (official ns_head_nm, ns_head)
  mask_blocks[: N]      masked-prediction blocks     (official mask_blocks)
  mask_head_nm, mask_head, mask_embed                (official mask_head_nm, mask_head, mask_embed)

Next-scale prediction runs blocks[:]; masked prediction runs blocks[:depth - N] then mask_blocks.
Masked finetuning (official finetune.py / models/mp.py) starts from a trained next-scale model:
`init_mask_branch_from_next_scale()` copies blocks[depth - N:] -> mask_blocks and the head ->
mask head (official MaskedPrediction loads the whole next-scale state_dict), then trains only
`MASK_BRANCH` parameters (the official trainable set: mask_embed, the head, the last N blocks;
everything before is frozen and thereby shared with the next-scale model).

API (B batch, L = sum(p * p for p in patch_nums), first_l = patch_nums[0] ** 2, V vocab_size,
Cvae tokenizer feature width, C width; labels int (B,), labels == num_classes is the null class):

  nsp_logits(labels, teacher_inputs (B, L - first_l, Cvae), *, train=False, key=None) -> (B, L, V)
  nsp_scale_logits(si, labels, scale_input (B, pn**2, Cvae) | None for si == 0) -> (B, pn**2, V)
      block_diagonal only.
  init_cache(batch) -> cache;  nsp_scale_logits_cached(si, labels, scale_input, cache)
      -> ((B, pn**2, V), cache)   call for si = 0, 1, ... in order; any pattern (VAR's way).
  mp_logits(labels, teacher_inputs (B, L - first_l, Cvae), mask_inputs (B, L - first_l, Cvae),
            mask (B, L - first_l) bool, *, train=False, key=None) -> (B, L - first_l, V)
  mp_scale_logits(si >= 1, labels, teacher_input (B, pn**2, Cvae), mask_input (B, pn**2, Cvae),
                  mask (B, pn**2) bool) -> (B, pn**2, V)

All logits are float32. `teacher_inputs` are the tokenizer's `teacher_forcing_inputs` (f_hat of the
scales before k, area-resized to scale k); `mask_inputs` its `scale_contributions` (scale k's own
phi-refined contribution). Masked-prediction input, as official get_word_embed:
W f_prev + where(mask, mask_embed, W contribution) + b (+ level and position embeddings).
With `train=True`, `key` (a PRNG key) drives class dropout (`cond_drop_rate`: labels -> null
class) and drop path; with train=False no randomness is used.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hmar_jax.models import blocks as blocks_lib
from pallas_kernels import patterns

# Parameter-path prefixes of the masked-prediction branch (the official finetuning's trainable set).
MASK_BRANCH = ("mask_blocks", "mask_head", "mask_head_nm", "mask_embed")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# What a block keeps for the backward pass (jax.checkpoint policies); 'none' keeps everything.
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  # matmul outputs and inputs (blocks.MATMUL_INPUT_NAMES): the backward pass recomputes no LayerNorm
  "dots_and_inputs": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_saveable,
    jax.checkpoint_policies.save_only_these_names(*blocks_lib.MATMUL_INPUT_NAMES),
  ),
}
# 'auto': the module keeps everything ('none'); the trainer compiles the step that way and, when
# XLA's memory analysis says it does not fit in the device's memory, recompiles it with
# REMAT_AUTO_FALLBACK (training.trainer.Trainer.compile_step).
REMAT_AUTO, REMAT_AUTO_FALLBACK = "auto", "dots"
# Parameter groups that are lists of blocks (list layout) or one stacked block (scan layout).
BLOCK_GROUPS = ("blocks", "mask_blocks")


def _dtype(name) -> jnp.dtype:
  if isinstance(name, str):
    if name not in _DTYPES:
      raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]
  return jnp.dtype(name)


def is_mask_branch_path(path: Sequence) -> bool:
  """True for a parameter path (tuple of keys) in the masked-prediction branch."""
  return bool(path) and str(path[0]) in MASK_BRANCH


def check_model_config(m: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first inconsistent field of a model config."""
  patterns.check_pattern(m.pattern)
  patterns.check_patch_nums(m.patch_nums)
  for name in ("depth", "width", "num_heads", "vocab_size", "cvae", "num_classes"):
    if int(m[name]) <= 0:
      raise ValueError(f"model.{name} must be positive, got {m[name]}")
  if m.width % m.num_heads:
    raise ValueError(f"model.width {m.width} is not divisible by model.num_heads {m.num_heads}")
  if not 0 <= m.mask_layers <= m.depth:
    raise ValueError(f"model.mask_layers must be in [0, depth={m.depth}], got {m.mask_layers}")
  if m.mask_layers and m.pattern != "block_diagonal":
    raise ValueError(
      f"a masked-prediction branch (model.mask_layers > 0) needs the HMAR pattern 'block_diagonal', got {m.pattern!r}"
    )
  if m.get("remat_policy", "none") not in (*REMAT_POLICIES, REMAT_AUTO):
    raise ValueError(
      f"model.remat_policy must be one of {sorted(REMAT_POLICIES) + [REMAT_AUTO]}, got {m.remat_policy!r}"
    )
  if not 0.0 <= m.cond_drop_rate < 1.0 or not 0.0 <= m.drop_path_rate < 1.0:
    raise ValueError(f"rates must be in [0, 1): cond_drop_rate={m.cond_drop_rate}, drop_path_rate={m.drop_path_rate}")
  _dtype(m.dtype), _dtype(m.param_dtype)


class ScaleTransformer(nnx.Module):
  """VAR / HMAR transformer. Build with `ScaleTransformer(config.model, rngs=nnx.Rngs(seed))`.

  Attributes mirror the official names (see hmar_jax/convert/var.py for the exact mapping):
  word_embed, class_emb, pos_start (1, first_l, C), pos_1LC (1, L, C), lvl_embed, blocks,
  head_nm, head, and with mask_layers > 0: mask_blocks, mask_head_nm, mask_head, mask_embed (1, C).
  """

  def __init__(self, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = model_config
    check_model_config(m)
    self.patch_nums = tuple(int(p) for p in m.patch_nums)
    self.pattern = m.pattern
    self.attn_implementation = m.attn_implementation
    self.depth, self.width, self.num_heads = int(m.depth), int(m.width), int(m.num_heads)
    self.vocab_size, self.cvae, self.num_classes = int(m.vocab_size), int(m.cvae), int(m.num_classes)
    self.cond_drop_rate = float(m.cond_drop_rate)
    self.mask_layers = int(m.mask_layers)
    policy = str(m.get("remat_policy", "none"))
    self.remat_policy = "none" if policy == REMAT_AUTO else policy
    self.scan_layers = bool(m.get("scan_layers", False))
    self.dtype = _dtype(m.dtype)
    param_dtype = _dtype(m.param_dtype)
    self.bounds = tuple(int(b) for b in patterns.scale_bounds(self.patch_nums))
    self.seq_len = self.bounds[-1]
    self.first_l = self.patch_nums[0] ** 2
    self.lvl_ids = tuple(int(i) for i in patterns.scale_ids(self.patch_nums))  # static (L,) scale ids

    c = self.width
    # official: init_std < 0 -> sqrt(1 / C / 3), used for every Linear / Embedding / pos param.
    init_std = math.sqrt(1 / c / 3) if m.init_std < 0 else float(m.init_std)
    emb_std = math.sqrt(1 / c / 3)  # pos_start, pos_1LC keep their constructor init
    tn = blocks_lib.trunc_normal
    part = blocks_lib.partitioned
    zeros = nnx.initializers.zeros_init()

    self.word_embed = nnx.Linear(
      self.cvae,
      c,
      param_dtype=param_dtype,
      kernel_init=part(tn(init_std), ("cvae", "embed")),
      bias_init=part(zeros, ("embed",)),
      rngs=rngs,
    )
    self.class_emb = nnx.Embed(
      self.num_classes + 1,
      c,
      param_dtype=param_dtype,
      embedding_init=part(tn(init_std), ("classes", "embed")),
      rngs=rngs,
    )
    self.pos_start = blocks_lib.param(
      rngs.params(), tn(emb_std), (1, self.first_l, c), (None, None, "embed"), param_dtype
    )
    self.pos_1LC = blocks_lib.param(
      rngs.params(), tn(emb_std), (1, self.seq_len, c), (None, "length", "embed"), param_dtype
    )
    self.lvl_embed = nnx.Embed(
      len(self.patch_nums),
      c,
      param_dtype=param_dtype,
      embedding_init=part(tn(init_std), ("levels", "embed")),
      rngs=rngs,
    )

    # official: dpr = linspace(0, drop_path_rate, depth), block i gets dpr[i].
    self.drop_rates = tuple(float(r) for r in np.linspace(0.0, float(m.drop_path_rate), self.depth))

    def make_block(i, rngs=rngs):
      return blocks_lib.AdaLNSelfAttn(
        width=c,
        num_heads=self.num_heads,
        mlp_ratio=float(m.mlp_ratio),
        depth=self.depth,
        attn_l2_norm=bool(m.attn_l2_norm),
        norm_eps=float(m.norm_eps),
        drop_path=0.0 if i is None else self.drop_rates[i],
        init_std=init_std,
        init_adaln=float(m.init_adaln),
        init_adaln_gamma=float(m.init_adaln_gamma),
        dtype=self.dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )

    def make_stack(n):
      """n blocks as one module whose parameters have a leading 'layers' axis (scan layout)."""

      @nnx.split_rngs(splits=n)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stack(rngs):
        return make_block(None, rngs)  # drop-path rates are passed per block when scanning

      return stack(rngs)

    def make_head():
      head_nm = blocks_lib.AdaLNBeforeHead(
        c,
        norm_eps=float(m.norm_eps),
        init_std=init_std,
        init_adaln=float(m.init_adaln),
        dtype=self.dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )
      # official init_weights: head.weight *= init_head (0.02), bias 0.
      head = nnx.Linear(
        c,
        self.vocab_size,
        dtype=self.dtype,
        param_dtype=param_dtype,
        kernel_init=part(tn(init_std * float(m.init_head)), ("embed", "vocab")),
        bias_init=part(zeros, ("vocab",)),
        rngs=rngs,
      )
      return head_nm, head

    def make_list(indices):
      """Blocks `indices` in the list layout, drawn together (blocks_lib.block_list), each with its
      own drop-path rate."""
      blocks = blocks_lib.block_list(lambda r: make_block(None, r), len(indices), rngs)
      for block, i in zip(blocks, indices, strict=True):
        block.drop_path = self.drop_rates[i]
      return blocks

    if self.scan_layers:
      self.blocks = make_stack(self.depth)
    else:
      self.blocks = make_list(range(self.depth))
    self.head_nm, self.head = make_head()
    if self.mask_layers:
      first = self.depth - self.mask_layers
      # official MaskedPrediction: these are blocks[depth - N:] of the finetuned model.
      if self.scan_layers:
        self.mask_blocks = make_stack(self.mask_layers)
      else:
        self.mask_blocks = make_list(range(first, first + self.mask_layers))
      self.mask_head_nm, self.mask_head = make_head()
      self.mask_embed = blocks_lib.param(rngs.params(), tn(init_std), (1, c), (None, "embed"), param_dtype)

  # ---------------------------------------------------------------- helpers
  def _check_labels(self, labels):
    if labels.ndim != 1:
      raise ValueError(f"labels must be (B,), got shape {labels.shape}")

  def _check_features(self, name, x, batch, length):
    if x.ndim != 3 or x.shape != (batch, length, self.cvae):
      raise ValueError(f"{name} must be (B, {length}, Cvae={self.cvae}) with B = {batch}, got shape {x.shape}")

  def _check_scale(self, si):
    if not 0 <= si < len(self.patch_nums):
      raise ValueError(f"scale index si={si} out of range for {len(self.patch_nums)} scales")

  def _cond(self, labels, train, key):
    """Class embedding (B, C) float32, with class dropout to the null class when training."""
    labels = labels.astype(jnp.int32)
    if train and self.cond_drop_rate > 0:
      if key is None:
        raise ValueError("train=True with cond_drop_rate > 0 needs a PRNG `key`")
      drop = jax.random.uniform(key, labels.shape) < self.cond_drop_rate
      labels = jnp.where(drop, self.num_classes, labels)
    return self.class_emb(labels).astype(jnp.float32)

  def _lvl_pos(self, start, end):
    """Level + absolute position embeddings of positions [start, end): (1, end - start, C)."""
    # Each scale's positions are one run of equal level ids: its row is broadcast over the run. A
    # gather (nnx.Embed's lookup) gives the same values, but its gradient is a scatter-add that GPUs
    # accumulate in a varying order, after the data-parallel all-reduce, so the replicas of this
    # table drifted apart between devices; the gradient of a broadcast is a deterministic sum.
    table = self.lvl_embed.embedding[...]
    runs = [(int(level), len(list(group))) for level, group in itertools.groupby(self.lvl_ids[start:end])]
    rows = jnp.concatenate([jnp.broadcast_to(table[level], (n, table.shape[-1])) for level, n in runs])
    return (rows[None] + self.pos_1LC[:, start:end]).astype(jnp.float32)

  def _sos(self, cond):
    """Start tokens (B, first_l, C) from the class embedding plus the learned start position."""
    return cond[:, None, :] + self.pos_start[...].astype(jnp.float32)

  def _embed_features(self, x, bias=True):
    y = jnp.einsum("blc,cd->bld", x.astype(jnp.float32), self.word_embed.kernel[...].astype(jnp.float32))
    return y + self.word_embed.bias[...].astype(jnp.float32) if bias else y

  def _mp_embed(self, teacher_inputs, mask_inputs, mask):
    """Official MaskedPrediction.get_word_embed: W f_prev + where(mask, mask_embed, W h) + b."""
    contrib = self._embed_features(mask_inputs, bias=False)
    contrib = jnp.where(mask[..., None], self.mask_embed[...].astype(jnp.float32)[None], contrib)
    return self._embed_features(teacher_inputs, bias=False) + contrib + self.word_embed.bias[...]

  def _block_segments(self, branch: str):
    """[(group name, start, stop, first block index)] of the blocks a branch runs, in order.

    'nsp' runs blocks[:]; 'mp' runs blocks[:depth - N] then mask_blocks[:] (which stand for
    blocks depth - N .. depth - 1, so they take those blocks' drop-path rates).
    """
    if branch == "nsp":
      return [("blocks", 0, self.depth, 0)]
    if not self.mask_layers:
      raise ValueError("this model has no masked-prediction branch (model.mask_layers == 0)")
    first = self.depth - self.mask_layers
    segments = [("blocks", 0, first, 0)] if first else []
    return segments + [("mask_blocks", 0, self.mask_layers, first)]

  def _run(self, x, cond, branch, patch_nums, key):
    """Runs the blocks of `branch` ('nsp' | 'mp') on x (B, N, C); `key` enables drop path."""
    segments = self._block_segments(branch)
    total = sum(stop - start for _, start, stop, _ in segments)
    keys = jax.random.split(key, total) if key is not None else None
    policy = REMAT_POLICIES[self.remat_policy]
    done = 0
    for group, start, stop, first in segments:
      n = stop - start
      seg_keys = None if keys is None else keys[done : done + n]
      rates = self.drop_rates[first : first + n]
      done += n

      def apply(block, x, k, rate):
        return block(
          x,
          cond,
          patch_nums=patch_nums,
          pattern=self.pattern,
          implementation=self.attn_implementation,
          key=k,
          drop_rate=rate,
        )

      if self.scan_layers:
        x = self._scan(getattr(self, group), start, stop, x, seg_keys, rates, apply, policy)
        continue
      if policy is not None:  # recompute each block's activations in the backward pass (memory for FLOPs)
        apply = nnx.remat(apply, policy=policy)
      for j, block in enumerate(list(getattr(self, group))[start:stop]):
        x = apply(block, x, None if seg_keys is None else seg_keys[j], rates[j])
    return x

  @staticmethod
  def _scan(stack, start, stop, x, keys, rates, apply, policy):
    """jax.lax.scan over blocks [start, stop) of a stacked block module: one compiled block body."""
    graphdef, params = nnx.split(stack)
    if (start, stop) != (0, jax.tree.leaves(params)[0].shape[0]):
      params = jax.tree.map(lambda a: a[start:stop], params)
    xs = {"params": params, "rate": jnp.asarray(rates, jnp.float32)}
    if keys is not None:
      xs["key"] = keys

    def body(x, xs):
      block = nnx.merge(graphdef, xs["params"])
      return apply(block, x, xs.get("key"), xs["rate"] if keys is not None else None), None

    if policy is not None:
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, xs)
    return x

  def _logits(self, x, cond, head_nm, head):
    h = head_nm(x, cond)
    logits = blocks_lib.matmul_f32_out(h.astype(self.dtype), head.kernel[...].astype(self.dtype))
    return logits + head.bias[...].astype(jnp.float32)

  def _train_keys(self, train, key):
    if not train:
      return None, None
    if key is None:
      raise ValueError("train=True needs a PRNG `key` (class dropout, drop path)")
    return tuple(jax.random.split(key))

  # ---------------------------------------------------------------- next-scale prediction
  def nsp_logits(
    self, labels: jax.Array, teacher_inputs: jax.Array, *, train: bool = False, key: jax.Array | None = None
  ) -> jax.Array:
    """Teacher-forced next-scale logits over all scales.

    Args:
      labels: (B,) int class ids; num_classes is the null (unconditional) class.
      teacher_inputs: (B, L - first_l, Cvae) tokenizer inputs of scales 1..S-1.
      train: class dropout and drop path on (needs `key`).
    Returns:
      (B, L, V) float32 logits; position range of scale k: `self.bounds[k]:self.bounds[k + 1]`.
    """
    self._check_labels(labels)
    self._check_features("teacher_inputs", teacher_inputs, labels.shape[0], self.seq_len - self.first_l)
    cond_key, block_key = self._train_keys(train, key)
    cond = self._cond(labels, train, cond_key)
    x = jnp.concatenate([self._sos(cond), self._embed_features(teacher_inputs)], axis=1)
    x = x + self._lvl_pos(0, self.seq_len)
    x = self._run(x, cond, "nsp", self.patch_nums, block_key)
    return self._logits(x, cond, self.head_nm, self.head)

  def _scale_tokens(self, si, cond, scale_input):
    start, end = self.bounds[si], self.bounds[si + 1]
    if si == 0:
      x = self._sos(cond)
    else:
      if scale_input is None:
        raise ValueError(f"scale {si} needs a scale_input")
      self._check_features("scale_input", scale_input, cond.shape[0], end - start)
      x = self._embed_features(scale_input)
    return x + self._lvl_pos(start, end)

  def nsp_scale_logits(self, si: int, labels: jax.Array, scale_input: jax.Array | None = None) -> jax.Array:
    """HMAR per-scale step: the blocks run on scale si's tokens only (block_diagonal model).

    Args:
      si: static scale index.
      labels: (B,) int.
      scale_input: (B, pn**2, Cvae) tokenizer input of scale si (None for si == 0).
    Returns:
      (B, pn**2, V) float32 logits, equal to nsp_logits(...)[:, bounds[si]:bounds[si + 1]].
    """
    if self.pattern != "block_diagonal":
      raise ValueError(
        "nsp_scale_logits needs the Markov 'block_diagonal' model; a "
        "'block_causal' (VAR) model steps with init_cache / nsp_scale_logits_cached"
      )
    self._check_scale(si)
    self._check_labels(labels)
    cond = self._cond(labels, False, None)
    x = self._scale_tokens(si, cond, scale_input)
    x = self._run(x, cond, "nsp", (self.patch_nums[si],), None)
    return self._logits(x, cond, self.head_nm, self.head)

  def init_cache(self, batch: int) -> list[dict] | dict:
    """Empty KV cache: per block {'k', 'v'} of (batch, H, L, head_dim) in the compute dtype
    (scan layout: one {'k', 'v'} of (batch, depth, H, L, head_dim)). The batch leads in both, so
    one PartitionSpec over the batch shards either layout.

    Heads before positions, as the attention's batched matmuls read them: with positions first,
    XLA's GPU compiler gave the scanned stack that layout inside the loop and transposed the whole
    cache into it on every step (VAR d24 at batch 64: 12 GiB of scratch per step)."""
    shape = (batch, self.num_heads, self.seq_len, self.width // self.num_heads)
    if self.scan_layers:
      shape = (batch, self.depth) + shape[1:]
      return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
    return [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)} for _ in range(self.depth)]

  def nsp_scale_logits_cached(
    self, si: int, labels: jax.Array, scale_input: jax.Array | None, cache: list[dict]
  ) -> tuple[jax.Array, list[dict]]:
    """VAR per-scale step with a KV cache (call for si = 0, 1, ... in order).

    Scale si's tokens attend to the cached keys of scales < si and to themselves, i.e. the
    block-causal pattern; for a 'block_diagonal' model this still gives the block-causal
    computation (used only to measure VAR-style inference).
    Returns:
      ((B, pn**2, V) float32 logits, updated cache).
    """
    self._check_scale(si)
    self._check_labels(labels)
    depth = cache["k"].shape[1] if isinstance(cache, dict) else len(cache)
    if depth != self.depth or isinstance(cache, dict) != self.scan_layers:
      raise ValueError(
        f"cache does not fit this model ({self.depth} blocks, "
        f"{'scan' if self.scan_layers else 'list'} layout): use model.init_cache"
      )
    cond = self._cond(labels, False, None)
    x = self._scale_tokens(si, cond, scale_input)
    start = self.bounds[si]
    if self.scan_layers:
      graphdef, params = nnx.split(self.blocks)

      # The blocks read the stack and return only their new positions, gathered in a (B, depth, H,
      # n, Dh) carry and written for all blocks at once after the loop, in place into a donated
      # cache. A stack written inside the loop was copied in and out whole by the TPU compiler (two
      # caches of scratch); one scanned as xs comes back freshly stacked.
      def body(carry, xs):
        x, fresh = carry
        x, kv = nnx.merge(graphdef, xs["params"]).cached_call(x, cond, cache, start, layer=xs["layer"])
        at = (0, xs["layer"], 0, 0, 0)
        return (x, {name: jax.lax.dynamic_update_slice(fresh[name], kv[name][:, None], at) for name in kv}), None

      b, n = x.shape[:2]
      h, d = cache["k"].shape[2], cache["k"].shape[4]
      fresh = {name: jnp.zeros((b, self.depth, h, n, d), cache[name].dtype) for name in ("k", "v")}
      layers = jnp.arange(self.depth, dtype=jnp.int32)
      (x, fresh), _ = jax.lax.scan(body, (x, fresh), {"params": params, "layer": layers})
      new_cache = {name: jax.lax.dynamic_update_slice(cache[name], fresh[name], (0, 0, 0, start, 0)) for name in fresh}
    else:
      new_cache = []
      for block, entry in zip(self.blocks, cache):
        x, entry = block.cached_call(x, cond, entry, start)
        new_cache.append(entry)
    return self._logits(x, cond, self.head_nm, self.head), new_cache

  # ---------------------------------------------------------------- masked prediction
  def mp_logits(
    self,
    labels: jax.Array,
    teacher_inputs: jax.Array,
    mask_inputs: jax.Array,
    mask: jax.Array,
    *,
    train: bool = False,
    key: jax.Array | None = None,
  ) -> jax.Array:
    """Masked-prediction logits of scales 1..S-1 (the 1x1 scale is never masked).

    Args:
      labels: (B,) int.
      teacher_inputs: (B, L - first_l, Cvae) f_hat of the earlier scales at each scale.
      mask_inputs: (B, L - first_l, Cvae) each scale's own contribution.
      mask: (B, L - first_l) bool, True where the token is replaced by the mask embedding.
    Returns:
      (B, L - first_l, V) float32 logits (scale k >= 1 at bounds[k] - first_l ...).
    """
    self._check_labels(labels)
    batch, length = labels.shape[0], self.seq_len - self.first_l
    self._block_segments("mp")  # raises without a masked branch
    self._check_features("teacher_inputs", teacher_inputs, batch, length)
    self._check_features("mask_inputs", mask_inputs, batch, length)
    if mask.shape != (batch, length):
      raise ValueError(f"mask must be (B, {length}) with B = {batch}, got shape {mask.shape}")
    cond_key, block_key = self._train_keys(train, key)
    cond = self._cond(labels, train, cond_key)
    x = self._mp_embed(teacher_inputs, mask_inputs, mask) + self._lvl_pos(self.first_l, self.seq_len)
    # block_diagonal: scale 0 affects no other scale, so it is left out of the sequence.
    x = self._run(x, cond, "mp", self.patch_nums[1:], block_key)
    return self._logits(x, cond, self.mask_head_nm, self.mask_head)

  def mp_scale_logits(
    self, si: int, labels: jax.Array, teacher_input: jax.Array, mask_input: jax.Array, mask: jax.Array
  ) -> jax.Array:
    """Masked-prediction step of one scale si >= 1 (official HMAR.generate's mask loop).

    Args:
      teacher_input: (B, pn**2, Cvae) f_hat of scales < si at scale si (tokenizer mask_step_inputs[0]).
      mask_input: (B, pn**2, Cvae) scale si's current contribution (mask_step_inputs[1]).
      mask: (B, pn**2) bool, True = masked.
    Returns:
      (B, pn**2, V) float32 logits.
    """
    self._check_scale(si)
    if si == 0:
      raise ValueError("masked prediction starts at scale 1 (the 1x1 scale is never masked)")
    self._check_labels(labels)
    self._block_segments("mp")
    batch, start, end = labels.shape[0], self.bounds[si], self.bounds[si + 1]
    self._check_features("teacher_input", teacher_input, batch, end - start)
    self._check_features("mask_input", mask_input, batch, end - start)
    if mask.shape != (batch, end - start):
      raise ValueError(f"mask must be (B, {end - start}) with B = {batch}, got shape {mask.shape}")
    cond = self._cond(labels, False, None)
    x = self._mp_embed(teacher_input, mask_input, mask) + self._lvl_pos(start, end)
    x = self._run(x, cond, "mp", (self.patch_nums[si],), None)
    return self._logits(x, cond, self.mask_head_nm, self.mask_head)

  def init_mask_branch_from_next_scale(self) -> None:
    """Copies the next-scale blocks[depth - N:] and head into the masked-prediction branch.

    Official finetuning starts its MaskedPrediction model from the whole next-scale state_dict
    (load_state_dict_with_word_embed); mask_embed keeps its fresh init.
    """
    if not self.mask_layers:
      raise ValueError("this model has no masked-prediction branch (model.mask_layers == 0)")
    first = self.depth - self.mask_layers
    if self.scan_layers:
      tail = jax.tree.map(lambda a: a[first:], nnx.state(self.blocks, nnx.Param))
      nnx.update(self.mask_blocks, tail)
    else:
      for j in range(self.mask_layers):
        nnx.update(self.mask_blocks[j], nnx.state(self.blocks[first + j], nnx.Param))
    nnx.update(self.mask_head_nm, nnx.state(self.head_nm, nnx.Param))
    nnx.update(self.mask_head, nnx.state(self.head, nnx.Param))


def count_params(module: nnx.Module, *, exclude_mask_branch: bool = False) -> int:
  """Number of parameters; `exclude_mask_branch` counts the next-scale model only."""
  total = 0
  for path, leaf in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    if exclude_mask_branch and is_mask_branch_path(path):
      continue
    total += int(np.prod(leaf.shape))
  return total
