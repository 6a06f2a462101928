"""The multi-scale sampler: schedules, seeds, guidance, refinement, and agreement with the full forward."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax import config_utils, sample
from hmar_jax.models.config import PATCH_NUMS_256, tiny_model_config
from hmar_jax.models.transformer import ScaleTransformer
from hmar_jax.sampling import (
  DEFAULT_MASK_SCHEDULE_256,
  Sampler,
  ScheduleError,
  check_sampling_options,
  validate_mask_schedule,
)
from hmar_jax.sampling import sampler as sampler_lib
from hmar_jax.sampling.sampler import _least_confident, default_decode_chunk
from hmar_jax.tokenizer.vqvae import VQVAE

SCHEDULE = [[1], [1, 3], [1, 2, 6], [25], [64]]  # for patch_nums (1, 2, 3, 5, 8)
LABELS = jnp.asarray([0, 3, 7, 9], jnp.int32)


def _random(ctor, seed, scale=0.3):
  """A module with N(0, scale^2) weights everywhere, built abstractly and filled from NumPy (eager
  initialisation would compile every op once, seconds on a loaded CPU). Such a model has sharp
  logits, so greedy decoding has no near-ties."""
  graphdef, state = nnx.split(nnx.eval_shape(ctor))
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), state))


def _tiny_vqvae_config():
  return config_utils.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "vqvae.py:tiny"))


def _transformer(kind, seed):
  return _random(lambda: ScaleTransformer(tiny_model_config(kind), rngs=nnx.Rngs(0)), seed)


@pytest.fixture(scope="module")
def vqvae():
  return _random(lambda: VQVAE(_tiny_vqvae_config(), rngs=nnx.Rngs(0)), 0, scale=0.1)


@pytest.fixture(scope="module")
def hmar(vqvae):
  model = _transformer("hmar", 1)
  return model, Sampler(model, vqvae)


def _teacher_forced_argmax(model, vqvae, maps):
  inputs = vqvae.quantizer.teacher_forcing_inputs(maps)
  logits = model.nsp_logits(LABELS, inputs)
  return np.asarray(jnp.argmax(logits, -1))


def test_schedule_that_does_not_sum_to_the_scale_is_rejected_before_compiling(hmar, vqvae):
  sampler = Sampler(hmar[0], vqvae)
  bad = [[1], [1, 3], [1, 2, 5], [25], [64]]
  with pytest.raises(ScheduleError, match=r"scale 2 \(3x3\).*must sum to 9"):
    sampler.sample(LABELS, 0, mask_schedule=bad)
  assert not sampler._jit  # nothing was compiled


@pytest.mark.parametrize(
  "option, message",
  [
    ({"cfg": -3.0}, r"^cfg must be a number >= 0"),
    ({"cfg": float("nan")}, r"^cfg must be a number >= 0"),
    ({"mask_cfg": -1.0}, r"^mask_cfg must be a number >= 0"),
    ({"top_k": -5}, r"^top_k must be an int >= 0 \(0 = off\), got -5"),
    ({"top_k": 2.5}, r"^top_k must be an int >= 0"),
    ({"top_p": 1.5}, r"^top_p must be in \[0, 1\] \(0 = off\), got 1\.5"),
    ({"top_p": -0.1}, r"^top_p must be in \[0, 1\]"),
  ],
)
def test_out_of_range_sampling_options_are_refused_naming_them_before_compiling(hmar, vqvae, option, message):
  # The filter reads these as 'off' (or 'keep all'): without the check they pass silently.
  sampler = Sampler(hmar[0], vqvae)
  with pytest.raises(ValueError, match=message):
    sampler.sample(LABELS, 0, **option)
  assert not sampler._jit  # nothing was compiled


def test_the_ends_of_the_sampling_option_ranges_are_accepted():
  check_sampling_options(cfg=0.0, top_k=0, top_p=0.0, mask_cfg=0.0)
  check_sampling_options(cfg=4, top_k=np.int64(900), top_p=1.0, mask_cfg=np.float32(0.5))


def test_write_sample_grid_refuses_an_unwritable_output_before_compiling(hmar, vqvae, tmp_path, monkeypatch):
  def no_sampler(*args, **kwargs):
    raise AssertionError("a sampler was built before the output was checked")

  monkeypatch.setattr(sample, "Sampler", no_sampler)
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ValueError, match="is a file, not a folder"):
    sample.write_sample_grid(hmar[0], vqvae, str(tmp_path / "a_file" / "samples.png"))
  with pytest.raises(ValueError, match=r"^top_p must be in \[0, 1\]"):
    sample.write_sample_grid(hmar[0], vqvae, str(tmp_path / "samples.png"), top_p=1.5)


def test_the_default_mask_schedule_is_accepted_by_name_for_the_256px_scales_only():
  assert validate_mask_schedule("default", PATCH_NUMS_256) == DEFAULT_MASK_SCHEDULE_256
  with pytest.raises(ScheduleError, match=r"'default' is the official one for the 256 px scales .* \(1, 2, 3, 5, 8\)"):
    validate_mask_schedule("default", (1, 2, 3, 5, 8))


def test_same_seed_same_images_other_seed_other_images(hmar):
  _, sampler = hmar
  kw = dict(cfg=1.5, top_k=20, top_p=0.9, mask_schedule=SCHEDULE)
  a = np.asarray(sampler.sample(LABELS, 5, **kw))
  b = np.asarray(sampler.sample(LABELS, 5, **kw))
  c = np.asarray(sampler.sample(LABELS, 6, **kw))
  assert a.shape == (4, 16, 16, 3) and a.min() >= 0 and a.max() <= 1
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Other top-k / top-p / cfg / schedules reuse the compiled steps: one per scale and kind (each
  # scale's step adds the scale before it to f_hat; the last scale's update is its own program).
  sampler.sample(LABELS, 5, cfg=0.5, top_k=0, top_p=0.5, mask_schedule=None)
  assert all(
    f._cache_size() == n for f, n in [(sampler._jit["nsp"], 5), (sampler._jit["mask"], 2), (sampler._jit["update"], 1)]
  )


def test_guidance_zero_is_the_conditional_model_alone(hmar):
  model, sampler = hmar
  kw = dict(top_k=0, top_p=0.0, mask_schedule=SCHEDULE)
  base0 = sampler.sample_indices(LABELS, 2, cfg=0.0, **kw)[0]
  base3 = sampler.sample_indices(LABELS, 2, cfg=3.0, **kw)[0]
  # Change only what the unconditional branch sees: the null-class embedding row.
  other = nnx.clone(model)
  other.class_emb.embedding[...] = other.class_emb.embedding[...].at[-1].set(5.0)
  sampler.update_model(other)
  try:
    new0 = sampler.sample_indices(LABELS, 2, cfg=0.0, **kw)[0]
    new3 = sampler.sample_indices(LABELS, 2, cfg=3.0, **kw)[0]
  finally:
    sampler.update_model(model)
  for a, b in zip(base0, new0):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(base3, new3))  # the branch matters when cfg > 0


def test_greedy_hmar_sampling_agrees_with_the_teacher_forced_forward(hmar, vqvae):
  model, sampler = hmar
  maps, _ = sampler.sample_indices(LABELS, 0, cfg=0.0, top_k=1, top_p=0.0, mask_schedule=None)
  flat = np.concatenate([np.asarray(m).reshape(4, -1) for m in maps], axis=1)
  np.testing.assert_array_equal(_teacher_forced_argmax(model, vqvae, maps), flat)


def test_greedy_var_kv_cache_sampling_agrees_with_the_full_forward(vqvae):
  model = _transformer("var", 2)
  sampler = Sampler(model, vqvae)
  assert sampler.use_kv_cache
  maps, _ = sampler.sample_indices(LABELS, 0, cfg=0.0, top_k=1, top_p=0.0)
  flat = np.concatenate([np.asarray(m).reshape(4, -1) for m in maps], axis=1)
  np.testing.assert_array_equal(_teacher_forced_argmax(model, vqvae, maps), flat)
  with pytest.raises(ValueError, match="no masked-prediction branch"):
    sampler.sample(LABELS, 0, mask_schedule=SCHEDULE)


def test_each_var_scale_step_rewrites_the_kv_cache_it_is_given_in_place(vqvae):
  model = _transformer("var", 2)
  sampler = Sampler(model, vqvae)
  sampler.precompile(LABELS, workers=2, cfg=1.5)
  cache_bytes = sum(a.nbytes for a in jax.tree.leaves(model.init_cache(2 * len(LABELS))))
  steps = [c for (name, _), cs in sampler._aot.items() if name == "nsp_cached" for c in cs]
  assert len(steps) == len(model.patch_nums)
  for compiled in steps:  # the donated cache is the output's buffer: no second cache alive at once
    assert compiled.memory_analysis().alias_size_in_bytes == cache_bytes


def test_refinement_resamples_exactly_the_scheduled_tokens(hmar):
  model, sampler = hmar
  kw = dict(cfg=0.0, top_k=1, top_p=0.0)
  plain = sampler.sample_indices(LABELS, 4, mask_schedule=None, **kw)[0]
  other = nnx.clone(model)
  other.mask_head.bias[...] = other.mask_head.bias[...].at[7].set(1e4)  # the mask branch always says 7
  sampler.update_model(other)
  try:
    refined = sampler.sample_indices(LABELS, 4, mask_schedule=SCHEDULE, **kw)[0]
  finally:
    sampler.update_model(model)
  np.testing.assert_array_equal(plain[0], refined[0])  # the 1x1 scale is never refined
  a, b = np.asarray(plain[1]).reshape(4, -1), np.asarray(refined[1]).reshape(4, -1)
  changed = a != b
  assert (changed.sum(-1) <= 3).all() and (b[changed] == 7).all()  # schedule [1, 3]: 3 tokens resampled
  assert ((b == 7).sum(-1) >= 3).all()
  assert ((np.asarray(refined[2]).reshape(4, -1) == 7).sum(-1) >= 8).all()  # [1, 2, 6]: 8 tokens


def test_least_confident_picks_the_lowest_scores_among_candidates():
  conf = jnp.asarray([[0.9, 0.1, 0.5, 0.3, 0.2]])
  cand = jnp.asarray([[True, False, True, True, True]])
  np.testing.assert_array_equal(_least_confident(conf, cand, jnp.int32(2)), [[False, False, False, True, True]])
  np.testing.assert_array_equal(_least_confident(conf, cand, jnp.int32(0)), [[False] * 5])


def test_a_list_layout_checkpoint_loads_for_sampling_with_its_blocks_scanned(tmp_path, vqvae):
  from hmar_jax import checkpoint  # noqa: PLC0415 - only this test saves a checkpoint

  config = tiny_model_config("hmar")
  assert not config.scan_layers  # the layout converted official weights are stored in
  model = _transformer("hmar", 4)
  checkpoint.save_params(str(tmp_path / "params"), model, metadata={"model": config.to_dict()})
  scanned = sample.load_transformer(str(tmp_path / "params"))
  kept = sample.load_transformer(str(tmp_path / "params"), scan_layers=None)
  assert scanned.scan_layers and not kept.scan_layers
  maps = [jnp.asarray(np.random.default_rng(si).integers(0, 16, (4, pn, pn))) for si, pn in enumerate(model.patch_nums)]
  inputs = vqvae.quantizer.teacher_forcing_inputs(maps)
  want = np.asarray(model.nsp_logits(LABELS, inputs))
  np.testing.assert_allclose(np.asarray(scanned.nsp_logits(LABELS, inputs)), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(kept.nsp_logits(LABELS, inputs)), want)


def test_decoding_in_chunks_gives_the_whole_batch_decode(vqvae):
  model = _transformer("hmar", 1)
  f_hat = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, vqvae.quantizer.z_channels)), jnp.float32)
  whole = Sampler(model, vqvae, decode_dtype="float32", decode_chunk=4).decode(f_hat)
  chunked = Sampler(model, vqvae, decode_dtype="float32", decode_chunk=2).decode(f_hat)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-5, atol=1e-5)


def test_a_batch_that_is_not_a_multiple_of_the_chunk_decodes_as_the_whole_batch(vqvae):
  model = _transformer("hmar", 1)
  f_hat = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8, 8, vqvae.quantizer.z_channels)), jnp.float32)
  whole = Sampler(model, vqvae, decode_dtype="float32", decode_chunk=3).decode(f_hat)
  chunked = Sampler(model, vqvae, decode_dtype="float32", decode_chunk=2).decode(f_hat)
  assert chunked.shape == whole.shape
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side, chunk", [(16, 16), (32, 4), (64, 1), (8, 64), (200, 1)])
def test_the_default_decode_chunk_holds_the_same_latent_positions_at_every_resolution(side, chunk):
  assert default_decode_chunk(side) == chunk


def test_a_bfloat16_decode_stays_within_bfloat16_rounding_of_the_float32_one(vqvae):
  model = _transformer("hmar", 1)
  f_hat = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, vqvae.quantizer.z_channels)), jnp.float32)
  ref = np.asarray(Sampler(model, vqvae, decode_dtype="float32").decode(f_hat))
  low = Sampler(model, vqvae, decode_dtype="bfloat16").decode(f_hat)
  assert low.dtype == jnp.float32
  assert 0 < np.abs(np.asarray(low) - ref).max() < 0.05  # bf16 keeps 8 bits: ~1% of the [0, 1] range per layer stack


def test_a_non_float_decode_dtype_is_refused(vqvae):
  with pytest.raises(ValueError, match="decode_dtype"):
    Sampler(_transformer("hmar", 1), vqvae, decode_dtype="int32")


def test_a_precompiled_sampler_compiles_nothing_when_sampling_and_gives_the_same_images(vqvae):
  model = _transformer("hmar", 1)
  kw = dict(cfg=1.5, top_k=5, top_p=0.9, mask_schedule=SCHEDULE)
  want = np.asarray(Sampler(model, vqvae).sample(LABELS, 3, **kw))
  sampler = Sampler(model, vqvae)
  count = sampler.precompile(LABELS, workers=2, **kw)
  assert count >= len(model.patch_nums) + 1  # a step per scale, at least, and the decode
  compiled = []
  jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiled.append(kw.get("fun_name")) if "backend_compile" in event else None
  )
  got = np.asarray(sampler.sample(LABELS, 3, **kw))
  sampler_pieces = [
    n for n in compiled if n and n.strip("_").split("_fn")[0] in ("nsp_step", "mask_step", "update", "decode")
  ]
  assert sampler_pieces == [], compiled
  np.testing.assert_array_equal(got, want)


def test_a_batch_of_another_size_than_precompiled_still_samples(vqvae):
  model = _transformer("hmar", 1)
  sampler = Sampler(model, vqvae)
  sampler.precompile(LABELS, workers=2)
  images = sampler.sample(LABELS[:2], 0)
  assert images.shape[0] == 2


def test_an_autotuning_level_xla_does_not_have_is_refused_naming_it(hmar, vqvae):
  with pytest.raises(ValueError, match=r"gpu_autotune_level must be one of \(0, 1, 2, 3, 4\) or None .*, got 9"):
    Sampler(hmar, vqvae, gpu_autotune_level=9)


def test_a_triton_gemm_choice_that_is_not_a_bool_is_refused_naming_it(hmar, vqvae):
  with pytest.raises(ValueError, match=r"gpu_triton_gemm must be True, False or None .*, got 'no'"):
    Sampler(hmar, vqvae, gpu_triton_gemm="no")


def test_a_sampler_with_gpu_options_precompiles_and_samples_the_same_images(vqvae, monkeypatch):
  # On the CPU the options never reach XLA; here they do (CPU XLA accepts them and ignores them), as
  # on a GPU, so every program the sampler jits, precompiled or not, carries compiler options.
  model = _transformer("hmar", 1)
  kw = dict(cfg=1.5, top_k=5, top_p=0.9, mask_schedule=SCHEDULE)
  want = np.asarray(Sampler(model, vqvae).sample(LABELS, 3, **kw))
  seen = []

  def as_on_a_gpu(level, triton_gemm=None):
    seen.append((level, triton_gemm))
    options = {"xla_gpu_autotune_level": level, "xla_gpu_enable_triton_gemm": triton_gemm}
    return {k: v for k, v in options.items() if v is not None} or None

  monkeypatch.setattr(sampler_lib, "gpu_compiler_options", as_on_a_gpu)
  precompiled = Sampler(model, vqvae, gpu_autotune_level=0)
  precompiled.precompile(LABELS, workers=2, **kw)
  np.testing.assert_array_equal(np.asarray(precompiled.sample(LABELS, 3, **kw)), want)
  np.testing.assert_array_equal(np.asarray(Sampler(model, vqvae, gpu_autotune_level=0).sample(LABELS, 3, **kw)), want)
  assert set(seen) == {(0, sampler_lib.DEFAULT_GPU_TRITON_GEMM)}


def test_the_lowering_pass_traces_with_the_garbage_collector_paused_and_turns_it_back_on(vqvae):
  import gc

  sampler = Sampler(_transformer("hmar", 1), vqvae)
  during = []
  compiled_jit = sampler._compiled_jit

  def recording(*a, **k):
    jitted = compiled_jit(*a, **k)

    class Recorder:
      def lower(self, *args, **static):
        during.append(gc.isenabled())
        return jitted.lower(*args, **static)

    return Recorder()

  sampler._compiled_jit = recording
  assert gc.isenabled()
  sampler._lower_all(jnp.asarray(LABELS), dict(cfg=1.5))
  assert during and not any(during)
  assert gc.isenabled()
