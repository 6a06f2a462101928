"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard event files, throughput and MFU.

Only the primary process writes. TensorBoard files are written with tensorboardX (no TensorFlow);
a vector metric (e.g. the loss per scale) becomes one scalar series per entry ('ce_per_scale/3').

MFU = model FLOPs per second / (peak dense bf16 FLOP/s per device x devices). The model FLOPs of a
step are the task's analytic count (forward + backward of its matrix products and attention; see
`hmar_jax.training.flops`), not XLA's cost analysis; the peak is the vendor's dense bf16 figure for
the device kind (PEAK_BF16_FLOPS), or unknown (no MFU) on devices not in the table, such as CPUs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter

# Dense bf16 peak FLOP/s per device (vendor datasheets), by substring of jax's device_kind.
PEAK_BF16_FLOPS = (
  ("H200", 989.5e12),
  ("H100", 989.5e12),
  ("GH200", 989.5e12),
  ("A100", 312e12),
  ("L40S", 362e12),
  ("TPU v6", 918e12),
  ("TPU v5p", 459e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5", 459e12),
  ("TPU v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind, or None when not known."""
  for name, flops in PEAK_BF16_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def to_host_scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Device metrics -> floats, and lists of floats for vectors."""
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    out[k] = float(v) if v.ndim == 0 else [round(float(x), 6) for x in v.ravel()]
  return out


class MetricsWriter:
  """Appends metrics rows to WORKDIR/metrics.jsonl and TensorBoard (primary process only)."""

  def __init__(self, workdir: str, *, enabled: bool, tensorboard: bool):
    self.enabled = enabled
    self._tb = None
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if tensorboard:
      self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"), flush_secs=30)

  def write(self, step: int, row: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **row}) + "\n")
    if self._tb is not None:
      for name, value in row.items():
        if isinstance(value, list):
          for i, x in enumerate(value):
            self._tb.add_scalar(f"{name}/{i}", x, step)
        elif isinstance(value, (int, float)):
          self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
