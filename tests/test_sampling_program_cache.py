"""The sampler's program cache: a later sampler reads the compiled programs back instead of tracing
and compiling them, gives the same images, and misses whenever the programs would differ."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from sampling_helpers import random_module, tiny_transformer, tiny_vqvae

from hmar_jax import sample
from hmar_jax.models.config import tiny_model_config
from hmar_jax.models.transformer import ScaleTransformer
from hmar_jax.sampling import Sampler, program_cache

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
LABELS = np.asarray([0, 3, 7, 9], np.int32)
SCHEDULE = [[1], [1, 3], [1, 2, 6], [25], [64]]  # for the tiny patch_nums (1, 2, 3, 5, 8)
KW = dict(cfg=1.5, top_k=5, top_p=0.9, mask_schedule=SCHEDULE)


@pytest.fixture(scope="module")
def models():
  return tiny_transformer("hmar", 1), tiny_vqvae(0)


@pytest.fixture
def fresh_jax_cache(tmp_path):
  """JAX's persistent compilation cache in an empty folder for one test (then the session's again),
  so the programs compile afresh: on the CPU only those are saved (program_cache.RESERIALIZABLE_PLATFORMS)."""
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", before)
  compilation_cache.reset_cache()


def _key(sampler, labels=LABELS, **kw):
  return sampler._program_cache_key(jax.numpy.asarray(labels), {**KW, **kw})


def _run(script: str, devices: int | None = None) -> str:
  """The last line `script` prints, run in a new process with no JAX cache: its programs compile
  afresh before any program runs, as in a user's first run (the CPU client may fail to serialise
  programs compiled after others ran: program_cache.DEFAULT_PLATFORMS). Its string hashes, so its
  set orders, are not this process's (PYTHONHASHSEED)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR="", PYTHONHASHSEED="0")
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  header = f"import sys\nsys.path.insert(0, {TESTS!r})\n"
  result = subprocess.run(
    [sys.executable, "-c", header + textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.strip().splitlines()[-1]


def test_a_later_sampler_reads_the_programs_without_tracing_or_compiling_and_gives_the_same_images(tmp_path):
  script = f"""
    import jax, numpy as np
    from sampling_helpers import tiny_transformer, tiny_vqvae
    from hmar_jax.sampling import Sampler
    models = tiny_transformer("hmar", 1), tiny_vqvae(0)
    labels, kw = np.asarray({LABELS.tolist()!r}, np.int32), {KW!r}
    first = Sampler(*models, program_cache={str(tmp_path)!r})
    first.precompile(labels, workers=2, **kw)
    first._program_cache_write.result()
    later = Sampler(*models, program_cache={str(tmp_path)!r})
    def no_tracing(*args):
      raise AssertionError("traced although the programs were saved")
    later._lower_all = no_tracing
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **k: compiled.append(k.get("fun_name")) if "backend_compile" in event else None
    )
    count = later.precompile(labels, workers=2, **kw)
    got = np.asarray(later.sample(labels, 3, **kw))
    pieces = [n for n in compiled if n and any(p in n for p in ("nsp_step", "mask_step", "update", "decode"))]
    same = np.array_equal(got, np.asarray(first.sample(labels, 3, **kw)))
    print(later.precompile_report["from_program_cache"], count == first.precompile_report["programs"], pieces, same)
  """
  assert _run(script) == "True True [] True"


def test_the_key_ignores_guidance_top_k_top_p_and_the_guidance_strength_of_the_masked_steps(models):
  sampler = Sampler(*models, program_cache="unused")
  base = _key(sampler, mask_cfg=0.5)
  assert _key(sampler, cfg=4.0, top_k=0, top_p=0.5, mask_cfg=2.0) == base


@pytest.mark.parametrize(
  "change",
  ["batch", "schedule", "masked_guidance", "decode_dtype", "architecture", "source", "xla_flags"],
)
def test_the_key_changes_with_whatever_changes_the_programs(models, change, monkeypatch):
  sampler = Sampler(*models, program_cache="unused")
  base = _key(sampler)
  if change == "batch":
    changed = _key(sampler, labels=LABELS[:2])
  elif change == "schedule":
    changed = _key(sampler, mask_schedule=None)
  elif change == "masked_guidance":  # guided masked steps run the batch twice
    changed = _key(sampler, mask_cfg=1.0)
  elif change == "decode_dtype":
    changed = _key(Sampler(*models, program_cache="unused", decode_dtype="bfloat16"))
  elif change == "architecture":
    config = tiny_model_config("hmar")
    config.depth += 1  # the same weight shapes per block, one block more
    deeper = random_module(lambda: ScaleTransformer(config, rngs=nnx.Rngs(0)), 1)
    changed = _key(Sampler(deeper, models[1], program_cache="unused"))
  elif change == "source":
    monkeypatch.setattr(program_cache, "source_fingerprint", lambda: "another version of the code")
    changed = _key(sampler)
  else:
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0")
    changed = _key(sampler)
  assert changed != base


def test_the_key_is_the_same_in_another_process(models):
  script = f"""
    import jax, numpy as np
    from sampling_helpers import tiny_transformer, tiny_vqvae
    from hmar_jax.sampling import Sampler
    sampler = Sampler(tiny_transformer("hmar", 1), tiny_vqvae(0), program_cache="unused")
    print(sampler._program_cache_key(jax.numpy.asarray({LABELS.tolist()!r}, np.int32), {KW!r}))
  """
  assert _run(script) == _key(Sampler(*models, program_cache="unused"))


def test_a_corrupt_entry_is_ignored_with_a_warning_and_the_programs_traced(models, tmp_path):
  sampler = Sampler(*models, program_cache=str(tmp_path))
  (tmp_path / f"{_key(sampler)}.pkl").write_bytes(b"not a pickle")
  with pytest.warns(UserWarning, match="ignoring the sampler's saved programs"):
    sampler.precompile(LABELS, workers=2, **KW)
  assert not sampler.precompile_report["from_program_cache"]
  assert np.asarray(sampler.sample(LABELS, 3, **KW)).shape[0] == len(LABELS)


def test_programs_that_cannot_be_serialised_leave_no_entry_and_sampling_goes_on(models, tmp_path, monkeypatch):
  from jax.experimental import serialize_executable

  def refuse(compiled):
    raise ValueError("Compilation does not support serialization")

  monkeypatch.setattr(serialize_executable, "serialize", refuse)
  monkeypatch.setattr(program_cache, "RESERIALIZABLE_PLATFORMS", (program_cache.platform(),))  # try every one
  sampler = Sampler(*models, program_cache=str(tmp_path))
  with pytest.warns(UserWarning, match="were not saved"):
    sampler.precompile(LABELS, workers=2, **KW)
    sampler._program_cache_write.result()
  assert os.listdir(tmp_path) == []
  assert np.asarray(sampler.sample(LABELS, 3, **KW)).shape[0] == len(LABELS)


def test_on_the_cpu_programs_that_jaxs_cache_supplied_are_not_saved(models, tmp_path, fresh_jax_cache):
  kw = dict(KW, mask_schedule=None)  # next-scale steps only: fewer programs to compile
  Sampler(*models).precompile(LABELS, workers=2, **kw)  # fills JAX's cache
  sampler = Sampler(*models, program_cache=str(tmp_path / "programs"))
  sampler.precompile(LABELS, workers=2, **kw)
  assert sampler._program_cache_write.result() is None
  assert not os.path.exists(tmp_path / "programs")


def test_the_programs_of_a_batch_split_over_four_devices_are_read_back_onto_those_devices(tmp_path):
  script = f"""
    import jax, numpy as np
    from sampling_helpers import tiny_transformer, tiny_vqvae
    from hmar_jax.sampling import Sampler
    from hmar_jax.sampling.at_scale import class_labels, sample_to_dir
    assert len(jax.local_devices()) == 4
    paths, read = [], []
    for run in ("first", "later"):
      sampler = Sampler(tiny_transformer("hmar", 1), tiny_vqvae(0), program_cache={str(tmp_path / "programs")!r})
      paths.append(sample_to_dir(sampler, {str(tmp_path)!r} + "/" + run, class_labels([2, 5], 4), batch_size=8,
                                 seed=3, show_progress=False, cfg=1.0, top_k=0, top_p=0.0))
      read.append(sampler.precompile_report["from_program_cache"])
      if sampler._program_cache_write:
        sampler._program_cache_write.result()
    with np.load(paths[0]) as a, np.load(paths[1]) as b:
      print(read, np.array_equal(a["arr_0"], b["arr_0"]))
  """
  assert _run(script, devices=4) == "[False, True] True"


@pytest.fixture
def compilation_cache_dir():
  """Sets JAX's compilation cache folder for a test and puts the session's back afterwards."""
  before = jax.config.jax_compilation_cache_dir
  yield lambda folder: jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_compilation_cache_dir", before)


def test_on_a_gpu_the_program_cache_lives_inside_jaxs_compilation_cache_and_is_off_with_it(
  compilation_cache_dir, monkeypatch
):
  monkeypatch.setattr(program_cache, "platform", lambda: "gpu")
  compilation_cache_dir("/cache")
  assert program_cache.default_program_cache_dir() == os.path.join("/cache", program_cache.SUBDIR)
  compilation_cache_dir(None)
  assert program_cache.default_program_cache_dir() is None


def test_on_the_cpu_there_is_no_program_cache_by_default(compilation_cache_dir):
  compilation_cache_dir("/cache")
  assert program_cache.platform() == "cpu" and program_cache.default_program_cache_dir() is None


def test_a_sampler_made_from_checkpoints_keeps_its_programs_in_the_default_program_cache(monkeypatch):
  class StandIn:
    def __init__(self, model, vqvae, **kwargs):
      self.kwargs = kwargs

    def load_weights_in_background(self, load):
      pass

  monkeypatch.setattr(sample, "start_device_warmup", lambda **kw: None)
  monkeypatch.setattr(sample, "abstract_transformer", lambda path: path)
  monkeypatch.setattr(sample, "abstract_vqvae_of_checkpoint", lambda path: path)
  monkeypatch.setattr(sample, "Sampler", StandIn)
  monkeypatch.setattr(sample, "default_program_cache_dir", lambda: "/cache/programs")
  assert sample.sampler_from_checkpoints("params", "tokenizer").kwargs["program_cache"] == "/cache/programs"
