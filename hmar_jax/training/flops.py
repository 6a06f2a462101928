"""Analytic FLOP counts of a training step, for MFU.

The model is the one the shared anchors of the official code use (so the figures compare):
  matmul = 6 x (token matmul weights x tokens + adaLN weights x images)
  attention = 12 x width x depth x attended (query, key) pairs per image x images
i.e. forward (2 FLOPs per multiply-add) plus backward (twice the forward) over the weights every
token passes through (the blocks' qkv, proj, fc1, fc2, the head and the word embedding; no biases),
the adaLN modulation counted once per image (it depends only on the class), and the two attention
products (QK^T and PV) over the pairs the block pattern lets through.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pallas_kernels import patterns


def attended_pairs(patch_nums: Sequence[int], pattern: str) -> int:
  """(query, key) pairs per image: block_diagonal sum_k n_k^2; block_causal sum_k n_k * (n_1 + .. + n_k)."""
  sizes = np.asarray([int(p) ** 2 for p in patch_nums], np.int64)
  if pattern == "block_diagonal":
    return int(np.sum(sizes * sizes))
  patterns.check_pattern(pattern)
  return int(np.sum(sizes * np.cumsum(sizes)))


def transformer_step_flops(m, *, images: int, branch: str = "nsp", trained: str = "all") -> float:
  """FLOPs of one training step of a ScaleTransformer config `m` on `images` images.

  branch: 'nsp' runs all blocks over all L tokens; 'mp' (masked prediction) runs depth blocks over
  the L - 1 tokens after the 1x1 scale. trained: 'all' (forward + backward everywhere) or 'mask'
  (only the masked branch's mask_layers blocks and head take the backward pass; the frozen blocks
  before them only the forward).
  """
  width, depth, vocab, cvae = int(m.width), int(m.depth), int(m.vocab_size), int(m.cvae)
  hidden = round(width * float(m.mlp_ratio))
  per_block_tok = width * 3 * width + width * width + 2 * width * hidden
  per_block_ada = width * 6 * width
  head_tok, head_ada = width * vocab, width * 2 * width
  seq = sum(int(p) ** 2 for p in m.patch_nums)
  patch_nums = tuple(m.patch_nums)
  if branch == "mp":
    seq -= int(patch_nums[0]) ** 2
    patch_nums = patch_nums[1:]
  pairs = attended_pairs(patch_nums, m.pattern)

  def blocks(n: int, factor: int) -> float:
    """n blocks, factor 2 (forward) or 6 (forward + backward); attention: 2 products x 2 FLOPs."""
    return factor * (n * per_block_tok * seq + n * per_block_ada) * images + factor * 2 * width * n * pairs * images

  if trained == "all":
    total = blocks(depth, 6)
  else:
    total = blocks(depth - int(m.mask_layers), 2) + blocks(int(m.mask_layers), 6)
  total += 6 * (head_tok * seq + head_ada) * images  # the head is always trained
  total += (6 if trained == "all" else 2) * cvae * width * seq * images  # word embedding
  return float(total)
