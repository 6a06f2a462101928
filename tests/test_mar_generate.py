"""MAR image sampling (hmar_jax/sampling/mar_generate.py) and its command line (hmar_jax/sample.py).

The sampler's tokens are compared with the official loop (hmar_jax/sampling/mar_sampler.py
`sample_tokens`, itself checked against the official code) driven by the model's own backbone
and DiffLoss.sample with Python-number guidance scales, i.e. without this module's compiled
wrappers (traced cfg and temperature, the static guidance flag).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from mar_sampling_helpers import tiny_kl_vae, tiny_mar, tiny_mar_config
from PIL import Image

from hmar_jax import sample
from hmar_jax.models.mar_model import save_mar
from hmar_jax.sampling.mar_generate import MARSampler
from hmar_jax.sampling.mar_sampler import backbone_sample_fn, sample_tokens
from hmar_jax.tokenizer.kl_vae import abstract_kl_vae, kl_vae_config, save_kl_vae

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

LABELS = np.array([0, 3, 3, 7], np.int32)
GUIDED = dict(num_iter=2, cfg=3.0, cfg_schedule="linear", temperature=1.0)
UNGUIDED = dict(num_iter=1, cfg=1.0, cfg_schedule="linear", temperature=0.95)


@pytest.fixture(scope="module")
def model():
  return tiny_mar(1)


@pytest.fixture(scope="module")
def vae():
  return tiny_kl_vae(0)


@pytest.fixture(scope="module")
def sampler(model, vae):
  return MARSampler(model, vae)


@pytest.fixture(scope="module")
def guided(sampler):
  """(tokens, images) of LABELS with seed 0 and the GUIDED options."""
  tokens = sampler.sample_tokens(LABELS, 0, **GUIDED)
  return np.asarray(tokens), np.asarray(sampler.decode(tokens))


@pytest.fixture(scope="module")
def checkpoints(model, vae, tmp_path_factory):
  root = tmp_path_factory.mktemp("mar_ckpt")
  params, tokenizer = str(root / "params"), str(root / "vae")
  save_mar(params, model, tiny_mar_config())
  save_kl_vae(tokenizer, vae)
  return params, tokenizer


def reference_tokens(model, labels, key, **options):
  """The official loop with the model's backbone and DiffLoss.sample taking Python-number scales."""
  return sample_tokens(
    backbone_sample_fn(model.backbone),
    lambda z, k, temperature, cfg: model.diffloss.sample(z, k, temperature, cfg),
    jnp.asarray(labels),
    key,
    seq_len=model.seq_len,
    token_dim=model.token_dim,
    **options,
  )


def run_cli(*args):
  """python -m hmar_jax.sample ARGS, in process, with its own flags."""
  values = flags.FlagValues()
  sample.define_flags(values)
  values(["prog", *args])
  sample.run(values)


def cache_sizes(s: MARSampler):
  return s.backbone_jit._cache_size(), s.head_jit._cache_size(), s.decode_jit._cache_size()


# ----------------------------------------------------------------------------- the sampler


def test_images_are_nhwc_in_the_unit_range_at_the_vae_resolution(guided):
  _, images = guided
  assert images.shape == (len(LABELS), 16, 16, 3) and images.dtype == np.float32
  assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
  assert images.std() > 0


def test_the_same_seed_gives_the_same_images_and_another_seed_other_ones(sampler, guided):
  tokens, images = guided
  np.testing.assert_array_equal(np.asarray(sampler.sample(LABELS, 0, **GUIDED)), images)
  other = np.asarray(sampler.sample_tokens(LABELS, 1, **GUIDED))
  assert not np.allclose(other, tokens)
  assert not np.allclose(np.asarray(sampler.decode(other)), images)


@pytest.mark.parametrize("options", [GUIDED, UNGUIDED], ids=["guided", "unguided"])
def test_the_tokens_are_the_official_loop_with_the_models_backbone_and_head(model, sampler, guided, options):
  tokens = guided[0] if options is GUIDED else np.asarray(sampler.sample_tokens(LABELS, 0, **options))
  expected = np.asarray(reference_tokens(model, LABELS, jax.random.key(0), **options))
  # Tokens reach 1e4 on random weights, after 100 steps of float32 rounding that differs between the
  # jitted sampler and the reference run op by op.
  np.testing.assert_allclose(tokens, expected, rtol=5e-5, atol=1e-3)


def test_another_cfg_temperature_or_seed_compiles_nothing_new(sampler, guided):
  before = cache_sizes(sampler)
  assert min(before) >= 1
  images = sampler.sample(LABELS, 5, num_iter=2, cfg=2.0, cfg_schedule="constant", temperature=0.8)
  assert cache_sizes(sampler) == before
  assert not np.allclose(np.asarray(images), guided[1])


@pytest.mark.parametrize(
  "labels, options, message",
  [
    (LABELS, dict(num_iter=0), "num_iter must be an integer >= 1"),
    (LABELS, dict(cfg=0.5), "cfg must be >= 1"),
    (LABELS, dict(cfg=float("nan")), "cfg must be >= 1"),
    (LABELS, dict(cfg_schedule="cosine"), "cfg_schedule must be one of linear, constant"),
    (LABELS, dict(temperature=0.0), "temperature must be > 0"),
    (np.array([0, 10]), {}, r"class ids \[10\] outside \[0, 10\)"),
    (np.array([-1, 2]), {}, r"class ids \[-1\] outside"),
    (np.zeros((2, 2), np.int32), {}, "labels must be a non-empty"),
  ],
)
def test_bad_options_and_labels_are_refused_before_anything_compiles(model, vae, labels, options, message):
  fresh = MARSampler(model, vae)
  with pytest.raises(ValueError, match=message):
    fresh.sample(labels, 0, **options)
  assert cache_sizes(fresh) == (0, 0, 0)


def test_a_vae_of_other_latents_than_the_models_is_refused(model):
  config = kl_vae_config("tiny")
  config.embed_dim = 8
  with pytest.raises(ValueError, match="does not match the MAR model"):
    MARSampler(model, abstract_kl_vae(config))


# ----------------------------------------------------------------------------- the command line


def test_the_command_line_writes_the_grid_write_mar_sample_grid_writes(model, vae, checkpoints, tmp_path, monkeypatch):
  params, tokenizer = checkpoints
  # Random weights give tokens so large that the decoded pixels hardly depend on cfg: the options
  # reaching the sampler are checked too.
  calls = []
  original = MARSampler.sample
  monkeypatch.setattr(MARSampler, "sample", lambda self, *a, **k: calls.append(k) or original(self, *a, **k))
  opts = ["--num_iter=2", "--cfg=3.0", "--cfg_schedule=constant", "--temperature=0.9", "--seed=4"]
  run_cli(
    f"--params={params}",
    f"--tokenizer={tokenizer}",
    "--classes=2",
    "--per_class=4",
    *opts,
    f"--out={tmp_path}/cli.png",
  )
  direct = sample.write_mar_sample_grid(
    model,
    vae,
    str(tmp_path / "direct.png"),
    classes=[2],
    per_class=4,
    num_iter=2,
    cfg=3.0,
    cfg_schedule="constant",
    temperature=0.9,
    seed=4,
  )
  cli_grid, direct_grid = np.asarray(Image.open(tmp_path / "cli.png")), np.asarray(Image.open(direct))
  assert cli_grid.ndim == 3 and cli_grid.shape[0] < cli_grid.shape[1]  # one row of 4 images
  np.testing.assert_array_equal(cli_grid, direct_grid)
  assert calls[0] == dict(num_iter=2, cfg=3.0, cfg_schedule="constant", temperature=0.9)


def test_hmar_options_are_refused_for_a_mar_checkpoint_before_loading_it(checkpoints, tmp_path, monkeypatch):
  params, tokenizer = checkpoints
  monkeypatch.setattr(sample, "load_mar", lambda *a, **k: pytest.fail("the checkpoint was loaded"))
  with pytest.raises(ValueError, match=r"--top_k, --mask_schedule: HMAR / VAR options, but .* holds a MAR model"):
    run_cli(
      f"--params={params}", f"--tokenizer={tokenizer}", "--top_k=5", "--mask_schedule=none", f"--out={tmp_path}/x.png"
    )


def test_mar_options_are_refused_for_a_checkpoint_that_is_not_mar(tmp_path):
  with pytest.raises(ValueError, match=r"--num_iter: MAR options, but /no/such/params holds no MAR parameters"):
    run_cli("--params=/no/such/params", "--tokenizer=/no/such/vae", "--num_iter=8", f"--out={tmp_path}/x.png")


def test_a_mar_cfg_below_one_is_refused_naming_the_flag(checkpoints, tmp_path):
  params, tokenizer = checkpoints
  with pytest.raises(ValueError, match=r"--cfg must be >= 1 for MAR"):
    run_cli(f"--params={params}", f"--tokenizer={tokenizer}", "--cfg=0", f"--out={tmp_path}/x.png")


def test_sampling_at_scale_on_two_devices_writes_every_image_resumes_and_refuses_other_settings(checkpoints, tmp_path):
  params, tokenizer = checkpoints
  out = str(tmp_path / "at_scale")
  script = textwrap.dedent(f"""
    import json, os, sys
    sys.path.insert(0, {TESTS!r})
    import jax
    from test_mar_generate import run_cli
    from hmar_jax.sampling.at_scale import batch_path
    from hmar_jax.sampling.mar_generate import MARSampler
    assert len(jax.local_devices()) == 2
    args = ["--params={params}", "--tokenizer={tokenizer}", "--classes=1,3", "--per_class=3", "--batch_size=4",
            "--num_iter=2", "--cfg=3.0", "--seed=2", "--out_dir={out}"]
    run_cli(*args)
    first = os.path.getmtime(batch_path({out!r}, 0))
    os.remove(batch_path({out!r}, 1))  # as if the run had stopped before writing batch 1
    drawn = []
    original = MARSampler.sample
    MARSampler.sample = lambda self, *a, **k: drawn.append(1) or original(self, *a, **k)
    run_cli(*args)
    try:
      run_cli(*args, "--temperature=0.9")
      refused = ""
    except ValueError as e:
      refused = str(e)
    print(json.dumps(dict(drawn=len(drawn), batch0_kept=first == os.path.getmtime(batch_path({out!r}, 0)),
                          refused=refused)))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["drawn"] == 1 and report["batch0_kept"]
  assert "sampling" in report["refused"] and "other settings" in report["refused"]
  with np.load(os.path.join(out, "samples_6x16x16x3.npz")) as f:
    images, labels = f["arr_0"], f["labels"]
  assert images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [1, 1, 1, 3, 3, 3])
  assert len(np.unique(images.reshape(6, -1), axis=0)) == 6
  assert os.path.exists(os.path.join(out, "grid.png"))
