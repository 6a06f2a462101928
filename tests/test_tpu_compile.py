"""The TPU compiler (XLA and Mosaic, from libtpu) accepts the kernels and the sharded train steps.

Runs on a CPU host against TPU device descriptions (jax.experimental.topologies): interpret mode
checks the kernels' logic, only this checks that Mosaic compiles them. Skipped without libtpu
(`pip install "jax[tpu]"`; requirements-test.txt installs it).
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from hmar_jax import aot, config_utils

pytestmark = pytest.mark.skipif(not aot.tpu_available(), reason='libtpu is not installed (pip install "jax[tpu]")')

# Scale side lengths at 256, 512 and 1024 px (VAR / HMAR tokenizer layouts).
PATCH_NUMS = {
  256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
  512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
  1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}

# Each chip compiles forward + backward for two settings; together they cover both patterns, the
# three resolutions, bf16 and f32, and head dims 64 and 128 on every chip generation.
KERNEL_CASES = [
  ("v5e:2x2", 256, "block_diagonal", jnp.bfloat16, 64),
  ("v5e:2x2", 1024, "block_causal", jnp.float32, 128),
  ("v5p:2x2x1", 512, "block_causal", jnp.bfloat16, 128),
  ("v5p:2x2x1", 1024, "block_diagonal", jnp.float32, 64),
  ("v6e:2x2", 512, "block_diagonal", jnp.float32, 64),
  ("v6e:2x2", 256, "block_causal", jnp.bfloat16, 128),
]


@pytest.mark.parametrize("topology,resolution,pattern,dtype,head_dim", KERNEL_CASES)
def test_mosaic_compiles_the_attention_kernels_forward_and_backward(topology, resolution, pattern, dtype, head_dim):
  compiled = aot.compile_attention(topology, PATCH_NUMS[resolution], pattern, dtype, head_dim)
  text = compiled.as_text()
  for kernel in ("scale_attention_fwd", "scale_attention_dq", "scale_attention_dkv"):
    assert kernel in text, f"{kernel} missing from the compiled {topology} program"


def test_a_kernel_the_chip_cannot_compile_is_named_with_its_shapes(monkeypatch):
  def refuse(self):
    raise RuntimeError("INTERNAL: Mosaic failed to compile TPU kernel: (made up for the test)\nmore lines")

  monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
  with pytest.raises(aot.AotError, match=r"block_causal scale attention.*L=680.*head dim 64.*bfloat16.*v5p"):
    aot.compile_attention("v5p:2x2x1", PATCH_NUMS[256], "block_causal", jnp.bfloat16, 64)


def test_an_unknown_topology_is_refused_by_name():
  with pytest.raises(aot.AotError, match="v9z:3x3"):
    aot.tpu_devices("v9z:3x3")


def _tiny(name: str, mesh: tuple[int, int, int]):
  config = config_utils.load_config_file(f"configs/{name}")
  config.mesh.shape = mesh
  if "num_heads" in config.model:
    config.model.num_heads = config.model.width // 64  # the Pallas kernels take head dim 64 or 128
    config.model.attn_implementation = "pallas_tpu"
  config.train.batch_size = 8
  if config.task == "tokenizer":  # 16 px: the same sharded step, compiled in two thirds of the time
    config.model.image_size, config.model.patch_nums = 16, (1, 2, 4)
  return config


# Every task on a 4-chip v5p slice, each on another (data, fsdp, tensor) mesh.
STEP_CASES = [
  ("hmar.py:tiny", (2, 2, 1)),
  ("var.py:tiny", (1, 2, 2)),
  ("hmar_mask.py:tiny", (4, 1, 1)),
  ("tokenizer.py:tiny", (1, 4, 1)),
]


@pytest.mark.parametrize("name,mesh", STEP_CASES)
def test_the_sharded_train_step_compiles_for_a_tpu_slice(name, mesh):
  devices = aot.tpu_devices("v5p:2x2x1")
  compiled, trainer = aot.compile_train_step(_tiny(name, mesh), devices)
  assert dict(trainer.mesh.shape) == dict(zip(("data", "fsdp", "tensor"), mesh, strict=True))
  report = aot.step_report(compiled, devices, 8)
  assert report["chip"] == "v5p" and report["fits"]
  assert report["flops_per_chip"] > 0 and report["total_gib"] > 0
  if "hmar" in name or "var" in name:  # the attention runs as Mosaic kernels under shard_map
    assert "scale_attention_fwd" in compiled.as_text()


def test_remat_auto_fits_the_step_to_the_chips_hbm(monkeypatch):
  devices = aot.tpu_devices("v5p:2x2x1")
  config = _tiny("hmar.py:tiny", (1, 4, 1))
  config.model.remat_policy = "auto"
  _, roomy = aot.compile_train_step(config, devices)
  assert roomy.step_changes == []
  small = dataclasses.replace(aot.chip_spec(devices), hbm_bytes=1024)  # a chip far too small for the step
  monkeypatch.setattr(aot, "chip_spec", lambda devices: small)
  _, squeezed = aot.compile_train_step(config, devices)
  assert squeezed.step_changes == ["model.remat_policy='dots'"]


@pytest.mark.parametrize("name", ["hmar_mask.py:tiny", "var.py:tiny"])
def test_every_program_of_the_sampler_compiles_for_a_tpu_slice_with_the_batch_split_over_the_chips(name):
  config = _tiny(name, (-1, 1, 1))
  pieces, mesh = aot.compile_sampler(config, aot.tpu_devices("v5p:2x2x1"), batch_per_chip=2)
  names = [label.split()[0] for label, _ in pieces]
  scales = len(config.model.patch_nums)
  # each scale's step adds the scale before it to f_hat: one update program, the last scale's
  assert names.count("nsp_cached" if "var" in name else "nsp") == scales and names.count("update") == 1
  assert ("mask" in names) == ("hmar" in name)  # HMAR's schedule refines some scales by masked steps
  label, decode = pieces[-1]
  (out,) = jax.tree.leaves(decode.out_info)
  assert label == "decode" and out.shape[0] == 8 and out.shape[3] == 3  # 2 x 4 RGB images
  assert decode.output_shardings.spec[0] in (("data", "fsdp"), "data") and dict(mesh.shape)["data"] == 4
  if "hmar" in name:  # HMAR's Markov steps run the Mosaic kernels under shard_map
    assert any("scale_attention_fwd" in c.as_text() for label, c in pieces if label.startswith("nsp"))
  report = aot.sampler_report(pieces, aot.tpu_devices("v5p:2x2x1"), 8)
  assert report["programs"] == len(pieces) and report["total_gib"] == max(report["total_gib_by_program"].values())


def test_a_sampler_schedule_the_model_cannot_run_is_refused_before_compiling(monkeypatch):
  monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self: pytest.fail("compiled"))
  config = _tiny("var.py:tiny", (-1, 1, 1))  # VAR: no masked-prediction branch to refine with
  config.sample.mask_schedule = "[[1], [1, 3], [9], [16], [36], [64]]"
  with pytest.raises(ValueError, match="masked-prediction branch"):
    aot.compile_sampler(config, aot.tpu_devices("v5p:2x2x1"), batch_per_chip=2)


class _FakeCompiled:
  """What step_report reads of a compiled step: its memory and cost analyses."""

  def __init__(self, args, out, alias, temp, flops, nbytes):
    self.mem = dict(
      argument_size_in_bytes=args,
      output_size_in_bytes=out,
      alias_size_in_bytes=alias,
      temp_size_in_bytes=temp,
      generated_code_size_in_bytes=0,
    )
    self.cost = {"flops": flops, "bytes accessed": nbytes}

  def memory_analysis(self):
    return type("Mem", (), self.mem)()

  def cost_analysis(self):
    return self.cost


def test_the_report_counts_donated_arguments_once_and_takes_the_slower_roofline():
  devices = aot.tpu_devices("v5p:2x2x1")
  gib = 2**30
  compiled = _FakeCompiled(args=10 * gib, out=10 * gib, alias=9 * gib, temp=5 * gib, flops=459e12, nbytes=2765e9 * 2)
  report = aot.step_report(compiled, devices, global_batch=64)
  assert report["total_gib"] == pytest.approx(16.0)  # 10 + 10 - 9 + 5
  assert report["fits"] and report["hbm_gib"] == pytest.approx(95.0)
  # 1 s of compute at v5p's 459 TFLOP/s, 2 s of HBM traffic at 2765 GB/s: memory-bound, 2 s.
  assert report["bound"] == "memory" and report["roofline_step_s"] == pytest.approx(2.0)
  assert report["roofline_img_s"] == pytest.approx(32.0)


def test_a_step_larger_than_the_chips_memory_fails_with_the_numbers(monkeypatch, capsys):
  gib = 2**30
  fake = _FakeCompiled(args=60 * gib, out=60 * gib, alias=60 * gib, temp=50 * gib, flops=1e12, nbytes=1e9)
  trainer = type("T", (), {"mesh": type("M", (), {"shape": {"data": 4, "fsdp": 1, "tensor": 1}})()})()
  trainer.task = type("Task", (), {"step_flops": lambda self, b: 4e12})()
  monkeypatch.setattr(aot, "compile_train_step", lambda config, devices: (fake, trainer))
  config = config_utils.load_config_file("configs/hmar.py:tiny")
  with pytest.raises(aot.AotError, match=r"110\.00 GiB per chip, more than the 95 GiB of a v5p chip"):
    aot.main_with(config, "v5p:2x2x1")
  assert "memory per chip 110.00 GiB" in capsys.readouterr().out


def test_with_model_flops_the_bound_comes_from_them_not_from_xlas_loop_blind_count():
  devices = aot.tpu_devices("v5p:2x2x1")
  gib = 2**30
  # XLA counted one scanned block (1 TFLOP per chip); the model's step is 4 x 459 TFLOP over 4 chips.
  compiled = _FakeCompiled(args=gib, out=gib, alias=gib, temp=gib, flops=1e12, nbytes=1e12)
  report = aot.step_report(compiled, devices, global_batch=256, model_flops=4 * 459e12)
  assert report["model_flops_per_chip"] == pytest.approx(459e12)
  assert report["bound"] == "compute" and report["roofline_step_s"] == pytest.approx(1.0)
  assert report["roofline_img_s"] == pytest.approx(256.0)


def test_a_step_the_tpu_compiler_finds_too_big_is_one_error_with_its_numbers(monkeypatch):
  def out_of_memory(self):
    raise RuntimeError(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (188.79G) "
      "exceeds available HBM (95.74G).\nmore"
    )

  monkeypatch.setattr(jax.stages.Lowered, "compile", out_of_memory)
  config = _tiny("hmar.py:tiny", (1, 4, 1))
  with pytest.raises(aot.AotError, match=r"does not fit a TPU v5 chip at global batch 8.*188\.79G.*95\.74G"):
    aot.compile_train_step(config, aot.tpu_devices("v5p:2x2x1"))


def test_a_scanned_var_cache_step_for_tpu_holds_no_second_cache():
  """The TPU compiler gives a loop-carried buffer its own layout: a cache written inside the scanned
  blocks was copied in and out whole (two caches of scratch). The blocks now only read it."""
  from flax import nnx
  from jax.sharding import SingleDeviceSharding

  from hmar_jax.models.config import tiny_model_config
  from hmar_jax.models.transformer import ScaleTransformer

  m = tiny_model_config("var")  # 4 blocks at width 1024: TPU tiles would pad a narrower cache
  m.scan_layers, m.dtype, m.attn_implementation = True, "bfloat16", "xla"
  m.depth, m.width, m.num_heads, m.patch_nums = 4, 1024, 16, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  model = nnx.eval_shape(lambda: ScaleTransformer(m, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  chip = SingleDeviceSharding(aot.tpu_devices("v5p:2x2x1")[0])
  on_chip = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=chip), tree)  # noqa: E731
  batch, si = 128, 4
  cache = jax.eval_shape(lambda: model.init_cache(batch))

  def step(state, labels, x, cache):
    return nnx.merge(graphdef, state).nsp_scale_logits_cached(si, labels, x, cache)

  x = jax.ShapeDtypeStruct((batch, m.patch_nums[si] ** 2, m.cvae), jnp.float32, sharding=chip)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=chip)
  compiled = jax.jit(step, donate_argnames="cache").lower(on_chip(state), labels, x, on_chip(cache)).compile()
  memory = compiled.memory_analysis()
  cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
  assert memory.alias_size_in_bytes == cache_bytes
  assert memory.temp_size_in_bytes < 0.75 * cache_bytes
