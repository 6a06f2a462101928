"""Inception weights for the evaluator: from TensorFlow's GraphDef or pytorch-fid's PyTorch file.

  python -m hmar_jax.evaluation.convert classify_image_graph_def.pb inception_params
  python -m hmar_jax.evaluation.convert pt_inception-2015-12-05-6726825d.pth inception_params

Sources (both hold the same inception-2015-12-05 weights):
  * classify_image_graph_def.pb: the graph the ADM evaluator runs (in TensorFlow's
    inception-2015-12-05.tgz; guided-diffusion's evaluator downloads it from its ref_batches folder).
    Weights are Const nodes '<layer>/conv2d_params' [kh, kw, in, out] and '<layer>/batchnorm/{beta,
    gamma,moving_mean,moving_variance}', the batch norm op '<layer>/batchnorm' carries
    variance_epsilon and scale_after_normalization (gamma is ignored when that is false), and the
    logits weight is input 1 of 'softmax/logits/MatMul' ('softmax/weights', [2048, 1008]).
  * pt_inception-2015-12-05-6726825d.pth: pytorch-fid's conversion of that graph, torchvision
    Inception3 names (Conv2d_1a_3x3.conv.weight, Mixed_5b.branch1x1.bn.running_mean, ..., fc.weight
    [1008, 2048], fc.bias - unused, as the evaluator's softmax has no bias).
The output is an hmar_jax parameter checkpoint (hmar_jax.checkpoint.save_params).
"""

from __future__ import annotations

import hashlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax import checkpoint, cli
from hmar_jax.abstract import abstract_module
from hmar_jax.convert import common
from hmar_jax.evaluation.graphdef import GraphDef, GraphDefError, read_graphdef
from hmar_jax.evaluation.inception import BN_EPSILON, InceptionV3

FORMAT = "inception-2015-12-05"


def _block_names(tf_block: str, torch_block: str, table: list[tuple[str, str]]) -> list[tuple[str, str]]:
  return [(f"{tf_block}/{tf}", f"{torch_block}.{pt}") for tf, pt in table]


_A = [("conv", "branch1x1"), ("tower/conv", "branch5x5_1"), ("tower/conv_1", "branch5x5_2")]
_A += [("tower_1/conv", "branch3x3dbl_1"), ("tower_1/conv_1", "branch3x3dbl_2"), ("tower_1/conv_2", "branch3x3dbl_3")]
_A += [("tower_2/conv", "branch_pool")]
_B = [("conv", "branch3x3"), ("tower/conv", "branch3x3dbl_1"), ("tower/conv_1", "branch3x3dbl_2")]
_B += [("tower/conv_2", "branch3x3dbl_3")]
_C = [("conv", "branch1x1")] + [
  (f"tower/{c}", f"branch7x7_{i + 1}") for i, c in enumerate(["conv", "conv_1", "conv_2"])
]
_C += [
  (f"tower_1/{c}", f"branch7x7dbl_{i + 1}") for i, c in enumerate(["conv", "conv_1", "conv_2", "conv_3", "conv_4"])
]
_C += [("tower_2/conv", "branch_pool")]
_D = [("tower/conv", "branch3x3_1"), ("tower/conv_1", "branch3x3_2")]
_D += [(f"tower_1/{c}", f"branch7x7x3_{i + 1}") for i, c in enumerate(["conv", "conv_1", "conv_2", "conv_3"])]
_E = [("conv", "branch1x1"), ("tower/conv", "branch3x3_1"), ("tower/mixed/conv", "branch3x3_2a")]
_E += [("tower/mixed/conv_1", "branch3x3_2b"), ("tower_1/conv", "branch3x3dbl_1"), ("tower_1/conv_1", "branch3x3dbl_2")]
_E += [
  ("tower_1/mixed/conv", "branch3x3dbl_3a"),
  ("tower_1/mixed/conv_1", "branch3x3dbl_3b"),
  ("tower_2/conv", "branch_pool"),
]

# (graph layer name, torchvision module name) of every conv + batch norm, in network order.
CONV_LAYERS: list[tuple[str, str]] = [
  ("conv", "Conv2d_1a_3x3"),
  ("conv_1", "Conv2d_2a_3x3"),
  ("conv_2", "Conv2d_2b_3x3"),
  ("conv_3", "Conv2d_3b_1x1"),
  ("conv_4", "Conv2d_4a_3x3"),
]
for _tf, _pt in [("mixed", "Mixed_5b"), ("mixed_1", "Mixed_5c"), ("mixed_2", "Mixed_5d")]:
  CONV_LAYERS += _block_names(_tf, _pt, _A)
CONV_LAYERS += _block_names("mixed_3", "Mixed_6a", _B)
for _tf, _pt in [("mixed_4", "Mixed_6b"), ("mixed_5", "Mixed_6c"), ("mixed_6", "Mixed_6d"), ("mixed_7", "Mixed_6e")]:
  CONV_LAYERS += _block_names(_tf, _pt, _C)
CONV_LAYERS += _block_names("mixed_8", "Mixed_7a", _D)
CONV_LAYERS += _block_names("mixed_9", "Mixed_7b", _E) + _block_names("mixed_10", "Mixed_7c", _E)

LOGITS_MATMUL = "softmax/logits/MatMul"
LOGITS_WEIGHTS = "softmax/weights"
# State_dict entries of pytorch-fid's file the evaluator has no use for.
_UNUSED_TORCH_KEYS = ("fc.bias",)


def abstract_inception() -> nnx.State:
  return nnx.state(abstract_module(lambda rngs: InceptionV3(rngs=rngs)), nnx.Param)


def zeros_inception() -> InceptionV3:
  """An InceptionV3 filled with zeros, built without running its (slow, eager) random initialisers."""
  graphdef, state = nnx.split(abstract_module(lambda rngs: InceptionV3(rngs=rngs)))
  return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))


def torch_plan(target: nnx.State) -> list[common.Entry]:
  """One Entry per tensor of pytorch-fid's state_dict (torchvision names) -> the NNX InceptionV3."""
  leaves = common.flat_leaves(target)
  plan = []
  for _, pt in CONV_LAYERS:
    path = tuple(pt.split("."))
    kernel = leaves[(*path, "kernel")].shape
    plan.append(
      common.Entry(f"{pt}.conv.weight", (*path, "kernel"), common.conv_source_shape(kernel), common.conv_kernel)
    )
    for src, dst in [("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")]:
      plan.append(common.Entry(f"{pt}.bn.{src}", (*path, dst), (kernel[-1],)))
  plan.append(
    common.Entry("fc.weight", ("fc",), common.linear_source_shape(leaves[("fc",)].shape), common.linear_kernel)
  )
  return plan


def state_dict_from_graphdef(graph: GraphDef) -> dict[str, np.ndarray]:
  """The graph's weights renamed and laid out as pytorch-fid's state_dict (conv weights [O, I, kh, kw],
  fc.weight [1008, 2048]), gamma replaced by ones where the graph does not scale after normalising.

  Raises ConversionError naming every missing graph node, and a batch norm epsilon other than 1e-3."""
  out, missing, problems = {}, [], []
  for tf, pt in CONV_LAYERS:
    kernel = graph.constant(f"{tf}/conv2d_params")
    if kernel is None:
      missing.append(f"{tf}/conv2d_params")
    else:
      out[f"{pt}.conv.weight"] = np.transpose(kernel, (3, 2, 0, 1)) if kernel.ndim == 4 else kernel
    bn = f"{tf}/batchnorm"
    stats = {}
    for name, key in [("moving_mean", "running_mean"), ("moving_variance", "running_var"), ("beta", "bias")]:
      value = graph.constant(f"{bn}/{name}")
      if value is None:
        missing.append(f"{bn}/{name}")
      else:
        stats[key] = value
    if bn not in graph.nodes:
      missing.append(bn)
      continue
    out.update({f"{pt}.bn.{k}": v for k, v in stats.items()})
    eps = graph.attr(bn, "variance_epsilon")
    if eps is not None and not np.isclose(eps, BN_EPSILON, rtol=1e-4):
      problems.append(f"{bn}: variance_epsilon {eps}, this network expects {BN_EPSILON}")
    if graph.attr(bn, "scale_after_normalization") in (False, None):
      if "running_mean" in stats:
        out[f"{pt}.bn.weight"] = np.ones_like(stats["running_mean"])
    else:
      gamma = graph.constant(f"{bn}/gamma")
      if gamma is None:
        missing.append(f"{bn}/gamma")
      else:
        out[f"{pt}.bn.weight"] = gamma
  weights_name = LOGITS_WEIGHTS
  if LOGITS_MATMUL in graph.nodes and len(graph.nodes[LOGITS_MATMUL].inputs) > 1:
    weights_name = graph.nodes[LOGITS_MATMUL].inputs[1]  # the evaluator takes exactly this tensor
  weights = graph.constant(weights_name)
  if weights is None:
    missing.append(weights_name)
  else:
    out["fc.weight"] = weights.T
  if missing:
    shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    raise common.ConversionError(
      f"{graph.source!r} is not the inception-2015-12-05 graph (classify_image_graph_def.pb): "
      f"{len(missing)} node(s) missing: {shown}"
    )
  if problems:
    raise common.ConversionError(f"{graph.source!r}: " + "; ".join(problems))
  return out


def inception_from_state_dict(state_dict: dict[str, np.ndarray], source_name: str) -> InceptionV3:
  """An InceptionV3 holding the weights of a pytorch-fid-layout state_dict (ConversionError on any mismatch)."""
  state_dict = {
    k: v for k, v in state_dict.items() if k not in _UNUSED_TORCH_KEYS and not k.endswith("num_batches_tracked")
  }
  target = abstract_inception()
  state = common.apply_plan(state_dict, torch_plan(target), target, source_name=source_name)
  model = abstract_module(lambda rngs: InceptionV3(rngs=rngs))
  nnx.update(model, state)
  return model


def _looks_like_checkpoint(path: str) -> bool:
  return os.path.isdir(path)


def load_inception(path: str | os.PathLike) -> InceptionV3:
  """The evaluator's InceptionV3 from a .pb GraphDef, a pytorch-fid .pth file or a checkpoint folder
  written by this converter. FileNotFoundError / ValueError (one message naming the file) otherwise."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"Inception weights {path!r} do not exist (give classify_image_graph_def.pb, "
      "pt_inception-2015-12-05-6726825d.pth or a folder written by hmar_jax.evaluation.convert)"
    )
  if _looks_like_checkpoint(path):
    meta = checkpoint.load_metadata(path)
    if meta.get("format") != FORMAT:
      raise ValueError(f"{path!r} is not an Inception checkpoint written by hmar_jax.evaluation.convert")
    return checkpoint.restore_params(path, zeros_inception())
  if path.endswith((".pth", ".pt")):
    return inception_from_state_dict(common.load_torch_checkpoint(path, what="Inception weights"), repr(path))
  try:
    graph = read_graphdef(path)
  except GraphDefError as e:
    raise common.ConversionError(
      f"{e} (expected classify_image_graph_def.pb, a pytorch-fid .pth file or a converted checkpoint folder)"
    ) from None
  try:
    state_dict = state_dict_from_graphdef(graph)
  except GraphDefError as e:  # a node that parses but whose tensor does not
    raise common.ConversionError(f"{path!r}: {e}") from None
  return inception_from_state_dict(state_dict, repr(path))


def weights_fingerprint(model: InceptionV3) -> str:
  """A hex digest of every parameter's bytes (in a fixed order), keying cached features to the weights."""
  h = hashlib.sha256()
  for path, var in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0])):
    h.update(str(path).encode())
    h.update(np.ascontiguousarray(jax.device_get(var.get_value())).tobytes())
  return h.hexdigest()


def convert(source: str | os.PathLike, out: str | os.PathLike) -> str:
  """Converts `source` (.pb or .pth) into a checkpoint folder `out` (which must not exist). Returns its path."""
  if os.path.exists(out):
    raise FileExistsError(f"output {os.fspath(out)!r} already exists; refusing to overwrite it")
  model = load_inception(source)
  meta = {"format": FORMAT, "source": os.path.basename(os.fspath(source))}
  return checkpoint.save_params(out, model, metadata=meta)


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise ValueError("usage: python -m hmar_jax.evaluation.convert SOURCE.pb|SOURCE.pth OUT_DIR")
  print(f"wrote {convert(argv[1], argv[2])}")


if __name__ == "__main__":
  try:
    main(sys.argv)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    cli.fail(f"{type(e).__name__}: {e}")
