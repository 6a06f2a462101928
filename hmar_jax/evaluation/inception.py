"""The InceptionV3 of TensorFlow's `classify_image_graph_def.pb` (inception-2015-12-05), in Flax NNX.

This is the network the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py) runs:
  * input: float images [N, H, W, 3] in [0, 255] fed at the graph's `ExpandDims:0`; the graph then
    resizes to 299 x 299 with TF1's legacy bilinear kernel, subtracts 128 and multiplies by 1/128;
  * every convolution is conv (no bias) -> BatchNormWithGlobalNormalization (variance_epsilon 1e-3)
    -> ReLU;
  * this 2015 graph differs from the later Keras / torchvision InceptionV3 in its pooling branches
    (as pytorch-fid's FID Inception documents): the 3x3 average pools of the 35x35, 17x17 and first
    8x8 blocks do not count padding, and the last block (mixed_10) max-pools instead;
  * outputs used by the evaluator: `pool_3` [N, 2048] (8x8 average pool), `mixed_6/conv` (the 1x1
    branch of the third 17x17 block, [N, 17, 17, 192]: the evaluator keeps channels :7) and the
    1008-way logits `pool_3 @ softmax/weights` (the evaluator uses the MatMul's weight, no bias).
Module names follow torchvision's Inception3 (Mixed_6d.branch1x1 = the graph's mixed_6/conv), the
naming of the PyTorch conversion pt_inception-2015-12-05; convert.py maps the graph's names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hmar_jax.evaluation.tf1_resize import resize_bilinear_tf1

INPUT_SIZE = 299
BN_EPSILON = 1e-3
NUM_LOGITS = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # the evaluator's `spatial[..., :7]`
_HIGHEST = jax.lax.Precision.HIGHEST  # float32 convolutions (no TF32 / bf16 passes on accelerators)


def preprocess(images: jnp.ndarray) -> jnp.ndarray:
  """uint8 (or float) images [N, H, W, 3] in [0, 255] -> [N, 299, 299, 3] float32, as the graph's
  ResizeBilinear -> Sub(128) -> Mul(1/128) ops."""
  x = resize_bilinear_tf1(images, INPUT_SIZE, INPUT_SIZE)
  return (x - 128.0) * (1.0 / 128.0)


class ConvBN(nnx.Module):
  """Conv2D (no bias) -> batch norm with stored statistics -> ReLU. x [N, H, W, cin] -> [N, H', W', cout]."""

  def __init__(self, cin: int, cout: int, kernel, stride: int = 1, same: bool = False, *, rngs: nnx.Rngs):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    fan_in = kh * kw * cin
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (kh, kw, cin, cout), jnp.float32) * (2.0 / fan_in) ** 0.5)
    self.mean = nnx.Param(jnp.zeros((cout,), jnp.float32))
    self.var = nnx.Param(jnp.ones((cout,), jnp.float32))
    self.scale = nnx.Param(jnp.ones((cout,), jnp.float32))  # 1 where the graph does not scale after normalising
    self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
    self.stride = stride
    # TF 'SAME' with stride 1 and odd kernels pads k // 2 on both sides; the stride-2 convs are 'VALID'.
    self.padding = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if same else ((0, 0), (0, 0))

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(
      x,
      self.kernel[...],
      (self.stride, self.stride),
      self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=_HIGHEST,
    )
    y = (y - self.mean[...]) * jax.lax.rsqrt(self.var[...] + BN_EPSILON) * self.scale[...] + self.bias[...]
    return jax.nn.relu(y)


def max_pool(x, window: int = 3, stride: int = 2, same: bool = False):
  pad = ((0, 0), (window // 2, window // 2), (window // 2, window // 2), (0, 0)) if same else "VALID"
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pad)


def avg_pool_same_excluding_padding(x, window: int = 3):
  """3x3 stride-1 'SAME' average pool dividing by the number of real (unpadded) inputs, as TF's AvgPool."""
  pad = ((0, 0), (window // 2, window // 2), (window // 2, window // 2), (0, 0))
  dims, strides = (1, window, window, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad)
  count = jax.lax.reduce_window(jnp.ones_like(x[:1, :, :, :1]), 0.0, jax.lax.add, dims, strides, pad)
  return total / count


class BlockA(nnx.Module):
  """35x35 block (graph mixed, mixed_1, mixed_2): [N, 35, 35, cin] -> [N, 35, 35, 224 + pool_features]."""

  def __init__(self, cin: int, pool_features: int, *, rngs):
    self.branch1x1 = ConvBN(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = ConvBN(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = ConvBN(48, 64, 5, same=True, rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, same=True, rngs=rngs)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, same=True, rngs=rngs)
    self.branch_pool = ConvBN(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_same_excluding_padding(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class BlockB(nnx.Module):
  """35 -> 17 reduction (graph mixed_3): [N, 35, 35, 288] -> [N, 17, 17, 768]."""

  def __init__(self, cin: int, *, rngs):
    self.branch3x3 = ConvBN(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, same=True, rngs=rngs)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


class BlockC(nnx.Module):
  """17x17 block with factorised 7x7 convolutions (graph mixed_4 .. mixed_7): [N, 17, 17, 768] twice.

  Returns (block output, its 1x1 branch [N, 17, 17, 192]) - the graph's `mixed_K/conv`."""

  def __init__(self, cin: int, c7: int, *, rngs):
    self.branch1x1 = ConvBN(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = ConvBN(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = ConvBN(c7, c7, (1, 7), same=True, rngs=rngs)
    self.branch7x7_3 = ConvBN(c7, 192, (7, 1), same=True, rngs=rngs)
    self.branch7x7dbl_1 = ConvBN(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), same=True, rngs=rngs)
    self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), same=True, rngs=rngs)
    self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), same=True, rngs=rngs)
    self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), same=True, rngs=rngs)
    self.branch_pool = ConvBN(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for conv in (
      self.branch7x7dbl_1,
      self.branch7x7dbl_2,
      self.branch7x7dbl_3,
      self.branch7x7dbl_4,
      self.branch7x7dbl_5,
    ):
      bd = conv(bd)
    bp = self.branch_pool(avg_pool_same_excluding_padding(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class BlockD(nnx.Module):
  """17 -> 8 reduction (graph mixed_8): [N, 17, 17, 768] -> [N, 8, 8, 1280]."""

  def __init__(self, cin: int, *, rngs):
    self.branch3x3_1 = ConvBN(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = ConvBN(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), same=True, rngs=rngs)
    self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), same=True, rngs=rngs)
    self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class BlockE(nnx.Module):
  """8x8 block with split 1x3 / 3x1 branches (graph mixed_9, mixed_10): [N, 8, 8, cin] -> [N, 8, 8, 2048].

  max_pool_branch: mixed_10's pooling branch max-pools (mixed_9's averages without padding)."""

  def __init__(self, cin: int, max_pool_branch: bool, *, rngs):
    self.branch1x1 = ConvBN(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = ConvBN(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = ConvBN(384, 384, (1, 3), same=True, rngs=rngs)
    self.branch3x3_2b = ConvBN(384, 384, (3, 1), same=True, rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(448, 384, 3, same=True, rngs=rngs)
    self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), same=True, rngs=rngs)
    self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), same=True, rngs=rngs)
    self.branch_pool = ConvBN(cin, 192, 1, rngs=rngs)
    self.max_pool_branch = max_pool_branch

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = max_pool(x, stride=1, same=True) if self.max_pool_branch else avg_pool_same_excluding_padding(x)
    return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
  """The evaluator's feature network; see the module docstring."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, same=True, rngs=rngs)
    self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, rngs=rngs)
    self.Mixed_5b = BlockA(192, 32, rngs=rngs)
    self.Mixed_5c = BlockA(256, 64, rngs=rngs)
    self.Mixed_5d = BlockA(288, 64, rngs=rngs)
    self.Mixed_6a = BlockB(288, rngs=rngs)
    self.Mixed_6b = BlockC(768, 128, rngs=rngs)
    self.Mixed_6c = BlockC(768, 160, rngs=rngs)
    self.Mixed_6d = BlockC(768, 160, rngs=rngs)
    self.Mixed_6e = BlockC(768, 192, rngs=rngs)
    self.Mixed_7a = BlockD(768, rngs=rngs)
    self.Mixed_7b = BlockE(1280, max_pool_branch=False, rngs=rngs)
    self.Mixed_7c = BlockE(2048, max_pool_branch=True, rngs=rngs)
    self.fc = nnx.Param(jax.random.normal(rngs.params(), (POOL_DIM, NUM_LOGITS), jnp.float32) * POOL_DIM**-0.5)

  def features(self, x):
    """Preprocessed x [N, 299, 299, 3] -> (pool_3 [N, 2048], mixed_6/conv [N, 17, 17, 192])."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool(x)
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
    x = self.Mixed_6a(x)
    x, _ = self.Mixed_6b(x)
    x, _ = self.Mixed_6c(x)
    x, spatial = self.Mixed_6d(x)
    x, _ = self.Mixed_6e(x)
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
    return jnp.mean(x, axis=(1, 2)), spatial  # pool_3: an 8x8 VALID average pool of the 8x8 map

  def logits(self, pool):
    """pool_3 [N, 2048] -> [N, 1008] (softmax/weights only, as the evaluator's softmax graph)."""
    return jnp.matmul(pool, self.fc[...], precision=_HIGHEST)

  def __call__(self, images):
    """images [N, H, W, 3] in [0, 255] -> {'pool_3': [N, 2048], 'spatial': [N, 2023], 'logits': [N, 1008]}.

    'spatial' is mixed_6/conv [N, 17, 17, 192] cut to its first 7 channels and flattened in
    (row, column, channel) order, as the evaluator's `spatial[..., :7].reshape([N, -1])`."""
    pool, spatial = self.features(preprocess(images))
    spatial = spatial[..., :SPATIAL_CHANNELS].reshape(spatial.shape[0], -1)
    return {"pool_3": pool, "spatial": spatial, "logits": self.logits(pool)}
