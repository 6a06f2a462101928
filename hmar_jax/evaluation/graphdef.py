"""Reading a TensorFlow GraphDef (.pb) without TensorFlow: a minimal protobuf wire-format decoder.

Only what weight extraction needs is decoded (field numbers from TensorFlow's graph.proto,
node_def.proto, attr_value.proto, tensor.proto, tensor_shape.proto):
  GraphDef:    1 node (NodeDef, repeated)
  NodeDef:     1 name, 2 op, 3 input (repeated), 5 attr (map<string, AttrValue>: entry 1 key, 2 value)
  AttrValue:   2 s, 3 i, 4 f, 5 b, 6 type, 8 tensor (other kinds are kept undecoded)
  TensorProto: 1 dtype, 2 tensor_shape, 4 tensor_content (raw little-endian), 5 float_val,
               6 double_val, 7 int_val (packed or not)
  TensorShapeProto: 2 dim (Dim: 1 size)
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import numpy as np

# TensorFlow DataType enum values (types.proto) this reader turns into arrays.
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 9: np.int64}


class GraphDefError(ValueError):
  """A file that is not a readable TensorFlow GraphDef."""


@dataclasses.dataclass
class Node:
  name: str
  op: str
  inputs: list[str]
  attrs: dict[str, Any]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    if pos >= len(buf) or shift > 63:
      raise GraphDefError("truncated or invalid varint")
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, pos


def fields(buf: bytes):
  """Yields (field number, wire type, value) of one message: ints for varints, bytes otherwise."""
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if number == 0:
      raise GraphDefError("field number 0")
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos : pos + 8], pos + 8
    elif wire == 2:
      size, pos = _varint(buf, pos)
      value, pos = buf[pos : pos + size], pos + size
    elif wire == 5:
      value, pos = buf[pos : pos + 4], pos + 4
    else:  # 3, 4: deprecated groups, never in a GraphDef; 6, 7: invalid
      raise GraphDefError(f"unsupported wire type {wire}")
    if pos > len(buf):
      raise GraphDefError("message ends inside a field")
    yield number, wire, value


def _signed(v: int) -> int:
  return v - (1 << 64) if v >= 1 << 63 else v


def _repeated_numbers(chunks: list[tuple[int, Any]], fmt: str, size: int) -> list:
  """Values of a repeated scalar field given as packed (wire 2) and/or unpacked entries."""
  out = []
  for wire, value in chunks:
    if wire == 2 and fmt in "fd":
      out.extend(struct.unpack(f"<{len(value) // size}{fmt}", value[: len(value) // size * size]))
    elif wire == 2:
      pos = 0
      while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(_signed(v))
    elif wire in (1, 5):
      out.append(struct.unpack(f"<{fmt}", value)[0])
    else:
      out.append(_signed(value))
  return out


def decode_tensor(buf: bytes) -> np.ndarray:
  """A TensorProto -> numpy array (GraphDefError for a dtype or layout this reader does not know)."""
  dtype, shape, content = 0, [], None
  values: dict[int, list] = {5: [], 6: [], 7: []}
  for number, wire, value in fields(buf):
    if number == 1:
      dtype = value
    elif number == 2:
      shape = [_signed(v) for n, _, dim in fields(value) if n == 2 for m, _, v in fields(dim) if m == 1]
    elif number == 4:
      content = value
    elif number in values:
      values[number].append((wire, value))
  if dtype not in _DTYPES:
    raise GraphDefError(f"tensor of unsupported dtype {dtype}")
  np_dtype = np.dtype(_DTYPES[dtype]).newbyteorder("<")
  count = int(np.prod(shape)) if shape else 1
  if content is not None:
    if len(content) != count * np_dtype.itemsize:
      raise GraphDefError(f"tensor content of {len(content)} bytes for shape {shape} of {np_dtype}")
    return np.frombuffer(content, np_dtype).astype(np_dtype.newbyteorder("="), copy=True).reshape(shape)
  if np_dtype.kind == "f":
    vals = _repeated_numbers(values[5], "f", 4) + _repeated_numbers(values[6], "d", 8)
  else:
    vals = _repeated_numbers(values[7], "q", 8)
  if not vals:
    return np.zeros(shape, np_dtype.newbyteorder("="))
  if len(vals) > count:
    raise GraphDefError(f"{len(vals)} values for a tensor of shape {shape}")
  # TensorProto semantics: fewer values than elements repeat the last one.
  vals = vals + [vals[-1]] * (count - len(vals))
  return np.asarray(vals, np_dtype.newbyteorder("=")).reshape(shape)


def _decode_attr(buf: bytes) -> Any:
  for number, _, value in fields(buf):
    if number == 2:
      return value.decode("utf-8", "replace")
    if number == 3:
      return _signed(value)
    if number == 4:
      return struct.unpack("<f", value)[0]
    if number in (5, 6):
      return value if number == 6 else bool(value)
    if number == 8:
      return decode_tensor(value)
  return None  # list / shape / func attributes: not needed here


def _decode_node(buf: bytes) -> Node:
  name, op, inputs, attrs = "", "", [], {}
  for number, _, value in fields(buf):
    if number == 1:
      name = value.decode("utf-8")
    elif number == 2:
      op = value.decode("utf-8")
    elif number == 3:
      inputs.append(value.decode("utf-8"))
    elif number == 5:
      key, attr = "", b""
      for n, _, v in fields(value):
        if n == 1:
          key = v.decode("utf-8")
        elif n == 2:
          attr = v
      attrs[key] = attr  # decoded on demand: most attributes are never read
  return Node(name, op, inputs, attrs)


class GraphDef:
  """The nodes of a GraphDef file by name; `attr(name, key)` decodes one attribute."""

  def __init__(self, nodes: list[Node], source: str):
    self.nodes = {n.name: n for n in nodes}
    self.source = source

  def attr(self, node: str, key: str) -> Any:
    raw = self.nodes[node].attrs.get(key)
    return None if raw is None else _decode_attr(raw)

  def constant(self, name: str) -> np.ndarray | None:
    """The value of Const node `name` (followed through Identity nodes), or None if absent."""
    name = name.split(":")[0]
    for _ in range(16):
      node = self.nodes.get(name)
      if node is None:
        return None
      if node.op == "Identity" and node.inputs:
        name = node.inputs[0].split(":")[0]
        continue
      if node.op != "Const":
        return None
      value = self.attr(name, "value")
      return value if isinstance(value, np.ndarray) else None
    return None


def read_graphdef(path: str | os.PathLike) -> GraphDef:
  """Parses a binary GraphDef file. FileNotFoundError if missing; GraphDefError if not a GraphDef."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Inception weights file {path!r} does not exist")
  with open(path, "rb") as f:
    data = f.read()
  try:
    nodes = [_decode_node(value) for number, wire, value in fields(data) if number == 1 and wire == 2]
  except (GraphDefError, UnicodeDecodeError, struct.error) as e:
    raise GraphDefError(f"{path!r} is not a TensorFlow GraphDef (.pb) file: {e}") from None
  if not nodes or not all(n.name and n.op for n in nodes):
    raise GraphDefError(f"{path!r} is not a TensorFlow GraphDef (.pb) file: it holds no graph nodes")
  return GraphDef(nodes, path)
