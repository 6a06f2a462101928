"""Inception weights from TensorFlow's GraphDef, pytorch-fid's .pth and converted checkpoints.

The test files are built here: a synthetic GraphDef (encoded with a small protobuf writer of this
file, independent of the reader under test) and a torch state_dict saved with torch.save."""

import struct

import numpy as np
import pytest
from flax import nnx

from hmar_jax.convert.common import ConversionError
from hmar_jax.evaluation import convert

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------- protobuf writer


def _varint(v: int) -> bytes:
  out = bytearray()
  while True:
    b = v & 0x7F
    v >>= 7
    out.append(b | (0x80 if v else 0))
    if not v:
      return bytes(out)


def _field(number: int, payload, wire: int = 2) -> bytes:
  key = _varint(number << 3 | wire)
  if wire == 0:
    return key + _varint(payload)
  if wire == 5:
    return key + payload
  return key + _varint(len(payload)) + payload


def _tensor(a: np.ndarray) -> bytes:
  shape = b"".join(_field(2, _field(1, d, wire=0)) for d in a.shape)
  return _field(1, 1, wire=0) + _field(2, shape) + _field(4, np.ascontiguousarray(a, "<f4").tobytes())


def _node(name: str, op: str, inputs=(), attrs=None) -> bytes:
  body = _field(1, name.encode()) + _field(2, op.encode())
  body += b"".join(_field(3, i.encode()) for i in inputs)
  for key, value in (attrs or {}).items():
    body += _field(5, _field(1, key.encode()) + _field(2, value))
  return _field(1, body)


def _const(name: str, a: np.ndarray) -> bytes:
  return _node(name, "Const", attrs={"value": _field(8, _tensor(a)), "dtype": _field(6, 1, wire=0)})


def _write_graphdef(path, weights: dict, *, scale_after: bool, skip=()) -> None:
  """A GraphDef holding `weights` as Const nodes, one BatchNormWithGlobalNormalization op per layer and
  softmax/logits/MatMul reading softmax/weights."""
  parts = [_node("ExpandDims", "Placeholder")]
  for name, value in weights.items():
    if name not in skip:
      parts.append(_const(name, value))
  for tf, _ in convert.CONV_LAYERS:
    bn = f"{tf}/batchnorm"
    attrs = {
      "variance_epsilon": _field(4, struct.pack("<f", 1e-3), wire=5),
      "scale_after_normalization": _field(5, int(scale_after), wire=0),
    }
    inputs = [f"{tf}/Conv2D"] + [f"{bn}/{k}" for k in ("moving_mean", "moving_variance", "beta", "gamma")]
    parts.append(_node(bn, "BatchNormWithGlobalNormalization", inputs, attrs))
  parts.append(_node("softmax/logits/MatMul", "MatMul", ["pool_3/_reshape", "softmax/weights"]))
  path.write_bytes(b"".join(parts))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tf_weights():
  """Random weights named and laid out as the graph's Const nodes (kernels [kh, kw, in, out])."""
  rng = np.random.default_rng(0)
  leaves = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(convert.abstract_inception())}
  out = {}
  for tf, pt in convert.CONV_LAYERS:
    shape = leaves[(*pt.split("."), "kernel")].shape
    out[f"{tf}/conv2d_params"] = rng.standard_normal(shape, np.float32)
    c = shape[-1]
    out[f"{tf}/batchnorm/beta"] = rng.standard_normal(c, np.float32)
    out[f"{tf}/batchnorm/gamma"] = rng.uniform(0.5, 2, c).astype(np.float32)
    out[f"{tf}/batchnorm/moving_mean"] = rng.standard_normal(c, np.float32)
    out[f"{tf}/batchnorm/moving_variance"] = rng.uniform(0.1, 2, c).astype(np.float32)
  out["softmax/weights"] = rng.standard_normal((2048, 1008), np.float32)
  out["softmax/biases"] = rng.standard_normal(1008, np.float32)
  return out


@pytest.fixture(scope="module")
def graph_file(tmp_path_factory, tf_weights):
  path = tmp_path_factory.mktemp("graph") / "classify_image_graph_def.pb"
  _write_graphdef(path, tf_weights, scale_after=False)
  return path


def _params(model) -> dict:
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_holds(params: dict, tf_weights: dict, *, gamma_used: bool):
  for tf, pt in convert.CONV_LAYERS:
    np.testing.assert_array_equal(params[f"{pt}.kernel"], tf_weights[f"{tf}/conv2d_params"])
    np.testing.assert_array_equal(params[f"{pt}.bias"], tf_weights[f"{tf}/batchnorm/beta"])
    np.testing.assert_array_equal(params[f"{pt}.mean"], tf_weights[f"{tf}/batchnorm/moving_mean"])
    np.testing.assert_array_equal(params[f"{pt}.var"], tf_weights[f"{tf}/batchnorm/moving_variance"])
    gamma = tf_weights[f"{tf}/batchnorm/gamma"]
    np.testing.assert_array_equal(params[f"{pt}.scale"], gamma if gamma_used else np.ones_like(gamma))
  np.testing.assert_array_equal(params["fc"], tf_weights["softmax/weights"])


# ----------------------------------------------------------------------------- tests


def test_graph_layer_names_map_to_the_evaluator_layers():
  names = dict(convert.CONV_LAYERS)
  assert len(names) == 94  # every conv + batch norm of inception-2015-12-05
  assert names["mixed_6/conv"] == "Mixed_6d.branch1x1"  # sFID's mixed_6/conv: third 17x17 block, 1x1 branch
  assert names["mixed_10/tower_1/mixed/conv_1"] == "Mixed_7c.branch3x3dbl_3b"
  assert names["conv_4"] == "Conv2d_4a_3x3"


def test_a_graphdef_converts_weight_for_weight_ignoring_gamma_without_scale_after_normalization(graph_file, tf_weights):
  _assert_holds(_params(convert.load_inception(graph_file)), tf_weights, gamma_used=False)


def test_a_graphdef_that_scales_after_normalization_keeps_gamma(tmp_path, tf_weights):
  path = tmp_path / "scaled.pb"
  _write_graphdef(path, tf_weights, scale_after=True)
  _assert_holds(_params(convert.load_inception(path)), tf_weights, gamma_used=True)


def test_a_pytorch_fid_state_dict_converts_to_the_same_weights(tmp_path, tf_weights):
  sd = {"fc.weight": torch.from_numpy(tf_weights["softmax/weights"].T.copy()), "fc.bias": torch.zeros(1008)}
  for tf, pt in convert.CONV_LAYERS:
    sd[f"{pt}.conv.weight"] = torch.from_numpy(np.transpose(tf_weights[f"{tf}/conv2d_params"], (3, 2, 0, 1)).copy())
    sd[f"{pt}.bn.weight"] = torch.from_numpy(tf_weights[f"{tf}/batchnorm/gamma"])
    sd[f"{pt}.bn.bias"] = torch.from_numpy(tf_weights[f"{tf}/batchnorm/beta"])
    sd[f"{pt}.bn.running_mean"] = torch.from_numpy(tf_weights[f"{tf}/batchnorm/moving_mean"])
    sd[f"{pt}.bn.running_var"] = torch.from_numpy(tf_weights[f"{tf}/batchnorm/moving_variance"])
  path = tmp_path / "pt_inception.pth"
  torch.save(sd, path)
  _assert_holds(_params(convert.load_inception(path)), tf_weights, gamma_used=True)


def test_a_converted_checkpoint_loads_back_identically(tmp_path, graph_file, tf_weights):
  out = convert.convert(graph_file, tmp_path / "inception")
  _assert_holds(_params(convert.load_inception(out)), tf_weights, gamma_used=False)


def test_converting_onto_an_existing_folder_is_refused(tmp_path, graph_file):
  (tmp_path / "taken").mkdir()
  with pytest.raises(FileExistsError, match="taken"):
    convert.convert(graph_file, tmp_path / "taken")


def test_a_missing_weights_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.pb"):
    convert.load_inception(tmp_path / "nowhere.pb")


def test_a_file_that_is_not_a_graphdef_is_refused_naming_it(tmp_path):
  path = tmp_path / "weights.pb"
  path.write_text("this is not a protobuf\n")
  with pytest.raises(ConversionError, match=r"weights\.pb.*not a TensorFlow GraphDef"):
    convert.load_inception(path)


def test_a_graphdef_lacking_a_layer_is_refused_naming_the_node(tmp_path, tf_weights):
  path = tmp_path / "partial.pb"
  _write_graphdef(path, tf_weights, scale_after=False, skip=("mixed_6/conv/conv2d_params",))
  with pytest.raises(ConversionError, match="mixed_6/conv/conv2d_params"):
    convert.load_inception(path)


def test_a_truncated_pth_file_is_refused_naming_it(tmp_path):
  path = tmp_path / "pt_inception.pth"
  torch.save({"fc.weight": torch.zeros(1008, 2048)}, path)
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(ConversionError, match="pt_inception.pth"):
    convert.load_inception(path)


def test_a_folder_that_is_not_an_inception_checkpoint_is_refused(tmp_path):
  with pytest.raises(ValueError, match="not an Inception checkpoint"):
    convert.load_inception(tmp_path)
