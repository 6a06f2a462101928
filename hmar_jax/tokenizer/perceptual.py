"""LPIPS-style perceptual loss (VGG16 features + learned 1x1 linear heads) in Flax NNX.

Nothing is downloaded: the weights come from a file the user supplies, e.g.
  * torchvision's VGG16 state_dict (`vgg16-397923af.pth`: keys `features.{i}.weight/bias`;
    `classifier.*` is ignored) together with the LPIPS linear heads (`lpips/weights/v0.1/vgg.pth`
    or taming-transformers' `vgg.pth`: keys `lin{k}.model.1.weight`), or
  * a whole `lpips.LPIPS(net='vgg')` state_dict (keys `net.slice{s}.{i}.weight/bias`,
    `lin{k}.model.1.weight`, `scaling_layer.shift/scale`), or
  * an .npz holding arrays under any of those key names (torch layouts: conv OIHW).
Reading .pth files needs PyTorch (imported only then); .npz needs nothing.

The distance (Zhang et al. 2018, `lpips` v0.1 as used by taming's VQLPIPSWithDiscriminator):
  x, y in [-1, 1] -> (x - shift) / scale -> VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
  -> unit-normalise over channels -> squared difference -> 1x1 conv to one channel (no bias)
  -> mean over space -> sum over the 5 layers.  Result: (B,).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.abstract import abstract_module

# lpips ScalingLayer buffers (ImageNet mean/std re-expressed for inputs in [-1, 1]).
LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
# torchvision vgg16 `features` indices of the 13 convs, grouped by the 5 LPIPS slices
# (slice1 = features[0:4] -> relu1_2, ..., slice5 = features[23:30] -> relu5_3); a 2x2 max pool
# starts every slice but the first.
VGG16_CONV_INDICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_CHANNELS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
LPIPS_LAYER_CHANNELS = tuple(c[-1] for c in VGG16_CHANNELS)  # (64, 128, 256, 512, 512)
_NORM_EPS = 1e-10  # lpips normalize_tensor


class PerceptualWeightsError(ValueError):
  """A perceptual-network weight file is missing keys, has unexpected keys or wrong shapes."""


class VGG16Features(nnx.Module):
  """The 13 convs of VGG16 (no classifier): images (B, H, W, 3) -> the 5 LPIPS feature maps."""

  def __init__(self, *, rngs: nnx.Rngs):
    convs = []
    in_ch = 3
    for block in VGG16_CHANNELS:
      for out_ch in block:
        convs.append(nnx.Conv(in_ch, out_ch, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs))
        in_ch = out_ch
    self.convs = nnx.List(convs)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """x: (B, H, W, 3) already scaled -> [relu1_2 (B,H,W,64), relu2_2 (B,H/2,W/2,128), ...,
    relu5_3 (B,H/16,W/16,512)]."""
    feats = []
    i = 0
    for b, block in enumerate(VGG16_CHANNELS):
      if b > 0:  # torch MaxPool2d(2, 2): floor for odd sizes, like VALID padding
        x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
      for _ in block:
        x = jax.nn.relu(self.convs[i](x))
        i += 1
      feats.append(x)
    return feats


class LPIPS(nnx.Module):
  """LPIPS distance with VGG16 features. __call__(x, y): (B, H, W, 3) in [-1, 1] twice -> (B,) float32.

  H, W >= 16 (relu5_3 is at 1/16 resolution). Build with random weights and then load real ones
  with `load_lpips(path, ...)`; training never updates these parameters.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    self.vgg = VGG16Features(rngs=rngs)
    # lpips NetLinLayer: a 1x1 conv C -> 1 without bias, stored here as a (C,) vector.
    self.lins = nnx.List([nnx.Param(jnp.full((c,), 1.0 / c, jnp.float32)) for c in LPIPS_LAYER_CHANNELS])

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"LPIPS expects two (B, H, W, 3) images of equal shape, got {x.shape} and {y.shape}")
    if min(x.shape[1:3]) < 16:
      raise ValueError(f"LPIPS needs images of at least 16x16 (VGG16 pools 4 times), got {x.shape[1:3]}")
    batch = x.shape[0]
    both = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
    both = (both - LPIPS_SHIFT) / LPIPS_SCALE
    total = jnp.zeros((batch,), jnp.float32)
    for feat, lin in zip(self.vgg(both), self.lins):
      feat = feat / (jnp.sqrt(jnp.sum(jnp.square(feat), axis=-1, keepdims=True)) + _NORM_EPS)
      diff = jnp.square(feat[:batch] - feat[batch:])  # (B, h, w, C)
      total = total + jnp.mean(diff @ lin[...], axis=(1, 2))
    return total


# ----------------------------------------------------------------------------- weight files


def read_weight_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a flat {key: array} dict from an .npz or a torch .pth/.pt/.bin state_dict."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"perceptual weight file {path!r} does not exist")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    try:
      with np.load(path, allow_pickle=False) as data:
        return {k: np.asarray(data[k]) for k in data.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, ...
      raise PerceptualWeightsError(f"cannot read {path!r} as an .npz archive: {e}") from e
  if ext in (".pth", ".pt", ".bin", ".ckpt"):
    try:
      import torch  # only for reading PyTorch files
    except ImportError as e:
      raise ImportError(f"reading {path!r} needs PyTorch (pip install torch), or convert it to .npz") from e
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
      raise PerceptualWeightsError(f"cannot read {path!r} as a PyTorch state_dict: {e}") from e
    for wrapper in ("state_dict", "model"):
      if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
      raise PerceptualWeightsError(f"{path!r} holds a {type(obj).__name__}, not a state_dict")
    out = {}
    for k, v in obj.items():
      if not hasattr(v, "detach"):
        raise PerceptualWeightsError(f"{path!r}: entry {k!r} is a {type(v).__name__}, not a tensor")
      out[k] = v.detach().float().cpu().numpy()
    return out
  raise PerceptualWeightsError(f"unsupported perceptual weight file type {ext!r} for {path!r}; use .npz or .pth")


_VGG_KEY = re.compile(r"^(?:features|net\.slice[1-5])\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^lin([0-4])\.model\.[01]\.weight$")
_IGNORED_KEY = re.compile(r"^(?:classifier\.\d+\.(?:weight|bias)|scaling_layer\.(?:shift|scale))$")


def canonical_lpips_weights(raw: Mapping[str, np.ndarray], source: str = "weights") -> dict[str, np.ndarray]:
  """Validates and renames weights to `features.{i}.weight|bias` (OIHW) and `lin{k}` (C,).

  Raises PerceptualWeightsError naming every missing, unexpected, duplicated or mis-shaped key.
  """
  out: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  problems = []
  for key, value in raw.items():
    value = np.asarray(value)
    if m := _VGG_KEY.match(key):
      name = f"features.{m.group(1)}.{m.group(2)}"
    elif m := _LIN_KEY.match(key):
      name = f"lin{m.group(1)}"
    elif _IGNORED_KEY.match(key):
      if key.startswith("scaling_layer."):
        want = LPIPS_SHIFT if key.endswith("shift") else LPIPS_SCALE
        if value.size != 3 or not np.allclose(value.ravel(), want, atol=1e-6):
          problems.append(f"{key} is {value.ravel().tolist()}, expected lpips' {want.tolist()}")
      continue
    else:
      problems.append(f"unexpected key {key!r}")
      continue
    if name in out:
      problems.append(f"{name} given twice ({origin[name]!r} and {key!r})")
      continue
    out[name], origin[name] = value, key
  expected = {}
  in_ch = 3
  for indices, chans in zip(VGG16_CONV_INDICES, VGG16_CHANNELS):
    for i, c in zip(indices, chans):
      expected[f"features.{i}.weight"] = (c, in_ch, 3, 3)
      expected[f"features.{i}.bias"] = (c,)
      in_ch = c
  for k, c in enumerate(LPIPS_LAYER_CHANNELS):
    expected[f"lin{k}"] = (1, c, 1, 1)
  for name, shape in expected.items():
    if name not in out:
      problems.append(
        f"missing key {name!r}"
        + (" (the LPIPS linear heads: pass the lpips vgg.pth too)" if name.startswith("lin") else "")
      )
      continue
    value = out[name]
    if name.startswith("lin") and value.shape == (shape[1],):
      value = value.reshape(shape)
    if value.shape != shape:
      problems.append(f"shape of {origin[name]!r} is {value.shape}, expected {shape}")
    out[name] = value
  for name in sorted(set(out) - set(expected)):
    problems.append(f"unexpected key {origin[name]!r} (not a VGG16 conv)")
  if problems:
    raise PerceptualWeightsError(f"{source}: " + "; ".join(problems))
  return {k: out[k].astype(np.float32) for k in expected}


def lpips_params_from_weights(weights: Mapping[str, np.ndarray]) -> dict:
  """Canonical torch-layout weights -> the pure-dict state of `LPIPS` (NHWC/HWIO layouts)."""
  convs = {}
  j = 0
  for indices in VGG16_CONV_INDICES:
    for i in indices:
      convs[j] = {
        "kernel": jnp.asarray(weights[f"features.{i}.weight"].transpose(2, 3, 1, 0)),
        "bias": jnp.asarray(weights[f"features.{i}.bias"]),
      }
      j += 1
  lins = {k: jnp.asarray(weights[f"lin{k}"].reshape(-1)) for k in range(len(LPIPS_LAYER_CHANNELS))}
  return {"vgg": {"convs": convs}, "lins": lins}


def load_lpips(paths: str | os.PathLike | Sequence[str | os.PathLike], *, rngs: nnx.Rngs | None = None) -> LPIPS:
  """Builds an LPIPS module from one or more weight files (their keys are merged; see module doc)."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  if not paths:
    raise ValueError("load_lpips needs at least one weight file")
  raw: dict[str, np.ndarray] = {}
  for path in paths:
    for k, v in read_weight_file(path).items():
      if k in raw:
        raise PerceptualWeightsError(f"key {k!r} appears in more than one of {list(map(os.fspath, paths))}")
      raw[k] = v
  weights = canonical_lpips_weights(raw, source=", ".join(map(os.fspath, paths)))
  # Built abstractly (no random init of 14.7M weights), then filled with the file's weights.
  graphdef, state = nnx.split(abstract_module(lambda default: LPIPS(rngs=rngs or default)))
  nnx.replace_by_pure_dict(state, lpips_params_from_weights(weights))
  return nnx.merge(graphdef, state)
