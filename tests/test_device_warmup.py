"""The devices' one-time start-up, paid in a background thread (hmar_jax/device_warmup.py)."""

import jax
import numpy as np
import pytest

from hmar_jax import device_warmup, sample


def test_the_warm_up_runs_its_matmul_and_convolution_on_every_device_it_is_given():
  placed = []
  put = jax.device_put

  def recording_put(x, device=None, *a, **k):
    placed.append(device)
    return put(x, device, *a, **k)

  devices = jax.local_devices()
  with pytest.MonkeyPatch.context() as m:
    m.setattr(device_warmup.jax, "device_put", recording_put)
    assert device_warmup.warm_up(devices) == devices
  assert placed == devices


def test_the_warm_up_program_computes_its_matmul_and_convolution():
  side = device_warmup.WARMUP_SIDE
  # ones: each matmul entry sums `side` ones; each convolution output sums its in-image 3x3 window
  # over 4 input channels, for 4 output channels; once in float32, once in bfloat16 (exact here)
  window = np.convolve(np.ones(side), np.ones(3), mode="same")
  conv = 4 * 4 * np.outer(window, window).sum()
  want = 2 * (side * side * side + conv)
  got = device_warmup._matmul_and_conv(False)(np.ones((1, side, side, 4), np.float32))
  assert float(got) == want


def test_a_started_warm_up_returns_the_devices_it_warmed_up():
  devices = jax.local_devices()[:1]
  assert device_warmup.start_device_warmup(devices).result(timeout=120) == devices


def test_a_sampler_made_from_checkpoints_starts_the_warm_up_first_with_its_matmul_setting(monkeypatch):
  calls = []
  monkeypatch.setattr(sample, "start_device_warmup", lambda **kw: calls.append(("warm_up", kw)))

  def stop_at_models(*a, **k):
    calls.append(("models", {}))
    raise RuntimeError("stop here")

  monkeypatch.setattr(sample, "abstract_transformer", stop_at_models)
  with pytest.raises(RuntimeError, match="stop here"):
    sample.sampler_from_checkpoints("params", "tokenizer", gpu_triton_gemm=True)
  assert calls == [("warm_up", {"triton_gemm": True}), ("models", {})]
