"""Training metrics: TensorBoard event files (read back here without TensorFlow), metrics.jsonl,
and the FLOP count behind MFU."""

import glob
import os
import struct

import pytest
from tensorboardX.proto import event_pb2
from training_helpers import nsp_config, read_jsonl

from hmar_jax.models import model_config
from hmar_jax.models.config import PATCH_NUMS_256, PATCH_NUMS_512
from hmar_jax.training.flops import attended_pairs, transformer_step_flops
from hmar_jax.training.metrics import peak_flops
from hmar_jax.training.trainer import train


def _read_events(path):
  """Scalars of a TFRecord event file: {tag: [(step, value)]} (record framing: length, crc, data, crc)."""
  out = {}
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos : pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
    pos += 12 + length + 4
    for v in event.summary.value:
      out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("metrics")
  config = nsp_config("hmar", steps=4)
  config.log.tensorboard = True
  config.log.every_steps = 2
  result = train(config, str(root))
  return root, result


def test_metrics_jsonl_has_losses_per_scale_lr_and_throughput(run):
  root, result = run
  rows = read_jsonl(root / "metrics.jsonl")
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    assert len(r["ce_per_scale"]) == len(r["acc_per_scale"]) == 5
    for key in ("loss", "grad_norm", "lr", "img_s", "tokens_s", "tflops_per_device"):
      assert r[key] > 0, key
    assert "mfu" not in r  # no peak FLOP/s is known for a CPU


def test_tensorboard_event_files_hold_the_same_scalars(run):
  root, _ = run
  files = glob.glob(os.path.join(root, "tensorboard", "events.out.tfevents.*"))
  assert len(files) == 1
  scalars = _read_events(files[0])
  rows = {r["step"]: r for r in read_jsonl(root / "metrics.jsonl")}
  assert [s for s, _ in scalars["loss"]] == [2, 4]
  for step, value in scalars["loss"]:
    assert value == pytest.approx(rows[step]["loss"], rel=1e-6)
  assert [s for s, _ in scalars["ce_per_scale/4"]] == [2, 4]


def test_attended_pairs_count_the_pattern():
  assert attended_pairs((1, 2, 3), "block_diagonal") == 1 + 16 + 81
  assert attended_pairs((1, 2, 3), "block_causal") == 1 * 1 + 4 * 5 + 9 * 14


# The shared anchors of the official code (official HMAR train step on one H200) state these
# FLOPs per step for their three settings; the same model must give the same numbers.
@pytest.mark.parametrize(
  "depth, patch_nums, batch, flops",
  [
    (16, PATCH_NUMS_256, 64, 55103641878528),
    (24, PATCH_NUMS_256, 32, 91170275328000),
    (16, PATCH_NUMS_512, 16, 49000237498368),
  ],
)
def test_step_flops_match_the_official_anchor_count(depth, patch_nums, batch, flops):
  assert transformer_step_flops(model_config(depth, patch_nums=patch_nums), images=batch) == flops


def test_finetuning_counts_the_backward_pass_of_the_trained_branch_only():
  m = model_config(16)
  full = transformer_step_flops(m, images=8, branch="mp")
  mask = transformer_step_flops(m, images=8, branch="mp", trained="mask")
  assert mask < full and mask > full / 3


def test_peak_flops_by_device_kind():
  assert peak_flops("NVIDIA H200") == 989.5e12 and peak_flops("TPU v5 lite") == 197e12
  assert peak_flops("cpu") is None
