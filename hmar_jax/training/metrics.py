"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard event files, throughput and MFU.

Only the primary process writes. A resumed run reads as one run: opening the writer at step S
drops the rows of metrics.jsonl with step > S (logged after the checkpoint the run resumes from;
they are logged again), rewriting the file atomically, and TensorBoard is told to hide the events
at steps > S of the earlier event files (see MetricsWriter). TensorBoard files are written with tensorboardX (no TensorFlow);
a vector metric (e.g. the loss per scale) becomes one scalar series per entry ('ce_per_scale/3').

MFU = model FLOPs per second / (peak dense bf16 FLOP/s per device x devices). The model FLOPs of a
step are the task's analytic count (forward + backward of its matrix products and attention; see
`hmar_jax.training.flops`), not XLA's cost analysis; the peak is the vendor's dense bf16 figure for
the device kind (PEAK_BF16_FLOPS), or unknown (no MFU) on devices not in the table, such as CPUs.
"""

from __future__ import annotations

import json
import logging
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
  """Appends metrics rows to WORKDIR/metrics.jsonl and TensorBoard (primary process only).

  start_step: the step training starts from (the checkpoint's step on resume, 0 for a fresh run).
  Rows already in metrics.jsonl past it are dropped, so every step appears once, in order. Event
  files cannot be cut short; instead the new event file begins with a session-start marker at
  start_step + 1 (tensorboardX purge_step), on which TensorBoard discards the events of the older
  files at that step and after, as it does for any restarted job.
  """

  def __init__(self, workdir: str, *, enabled: bool, tensorboard: bool, start_step: int = 0):
    self.enabled = enabled
    self._tb = None
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    truncate_metrics(self.path, start_step)
    if tensorboard:
      self._tb = SummaryWriter(
        logdir=os.path.join(workdir, "tensorboard"), flush_secs=30, purge_step=int(start_step) + 1
      )

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


def truncate_metrics(path: str, last_step: int) -> int:
  """Drops the rows of the metrics.jsonl at `path` with step > last_step; returns how many went.

  A line that is not a JSON row (the last line of a run killed while writing it) goes too, with a
  warning. The file is rewritten into a temporary file and renamed over the old one, so a crash
  here leaves the old file or the new one, never half of it. Nothing is rewritten when nothing goes.
  """
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  keep, dropped = [], 0
  for number, line in enumerate(lines, 1):
    try:
      step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      logging.warning("%s line %d is not a metrics row; dropping it: %.80r", path, number, line)
      dropped += 1
      continue
    if step > last_step:
      dropped += 1
    else:
      keep.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
  return dropped
