"""Command lines: bad input ends in one 'error:' line and exit status 2, before any training.

The messages are checked in process through cli.parse_flags (the parser every entry point runs);
a few subprocess runs check that each entry point turns them into the one line.
"""

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from hmar_jax import cli
from hmar_jax.sample import check_output_path

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CONFIGS = os.path.join(ROOT, "configs")


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _one_error_line(result) -> str:
  """The stderr of a command refused as bad input: exactly one line, 'error: ...', status 2."""
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  return lines[0]


def _parse(*args):
  """Parses `prog ARGS` into fresh flags like hmar_jax.train's (--config file, --workdir)."""
  argv = ["prog", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "output folder", flag_values=values)
  rest = cli.parse_flags(argv, values)
  return values, rest


# ----------------------------------------------------------------------------- subprocesses


def test_train_with_a_missing_tokenizer_checkpoint_fails_naming_it(tmp_path):
  result = _run(
    "hmar_jax.train",
    "--config=configs/hmar.py:tiny",
    f"--workdir={tmp_path}",
    "--config.tokenizer.checkpoint=/no/such/tokenizer",
  )
  assert result.returncode == 2
  assert "error:" in result.stderr and "/no/such/tokenizer" in result.stderr
  assert "Traceback" not in result.stderr


def test_train_with_an_unknown_task_fails_naming_the_choices(tmp_path):
  result = _run(
    "hmar_jax.train", "--config=configs/hmar.py:tiny", f"--workdir={tmp_path}", "--config.task=segmentation"
  )
  assert result.returncode == 2
  assert "config.task must be one of" in result.stderr and "'segmentation'" in result.stderr


def test_train_with_a_missing_config_file_fails_in_one_line(tmp_path):
  line = _one_error_line(_run("hmar_jax.train", "--config=configs/nope.py", f"--workdir={tmp_path / 'w'}"))
  assert "configs/nope.py' not found" in line
  assert not (tmp_path / "w").exists()


def test_train_with_a_stray_argument_fails_in_one_line(tmp_path):
  # absl's UsageError printed the whole module docstring before the problem.
  line = _one_error_line(_run("hmar_jax.train", "--config=configs/hmar.py:tiny", f"--workdir={tmp_path}", "stray"))
  assert "unexpected arguments: ['stray']" in line


def test_main_with_an_unknown_override_of_its_default_config_fails_in_one_line(tmp_path):
  # The quick start's config is its default: a mistake in an override used to surface while the
  # module was imported, before any error handling.
  line = _one_error_line(_run("hmar_jax.main", "--config.nsp.trian.num_steps=3", f"--workdir={tmp_path / 'w'}"))
  assert "config.nsp.trian.num_steps" in line and "config.nsp.train.num_steps" in line
  assert not (tmp_path / "w").exists()


def test_sample_refuses_an_unwritable_output_before_loading_the_checkpoints(tmp_path):
  (tmp_path / "a_file").write_text("")
  out = tmp_path / "a_file" / "samples.png"
  line = _one_error_line(
    _run("hmar_jax.sample", "--params=/no/such/params", "--tokenizer=/no/such/vae", f"--out={out}")
  )
  assert str(out) in line and "is a file, not a folder" in line


# ----------------------------------------------------------------------------- in process


def test_a_config_file_and_its_overrides_parse_into_the_config():
  values, rest = _parse(f"--config={CONFIGS}/hmar.py:tiny", "--config.train.num_steps=7", "--workdir=w")
  assert values.config.train.num_steps == 7 and values.config.task == "nsp" and values.workdir == "w"
  assert rest == ["prog"]


def test_a_missing_config_file_is_named_with_the_config_files_beside_it():
  with pytest.raises(FileNotFoundError, match=r"--config: config file '.*nope\.py' not found; .* holds .*hmar\.py"):
    _parse(f"--config={CONFIGS}/nope.py")


def test_a_config_file_that_is_not_python_is_refused():
  with pytest.raises(ValueError, match=r"--config: config file '.*README\.md' is not a Python file"):
    _parse(f"--config={ROOT}/README.md")


@pytest.mark.parametrize(
  "spec, valid",
  [
    ("hmar.py:d99", "tiny, d16, d20, d24, d30, d16_512"),
    ("hmar.py:bogus", "tiny, d16, d20, d24, d30, d16_512"),
    ("var.py:d99", "tiny, d16, d20, d24, d30, d16_512"),
    ("hmar_mask.py:bogus", "tiny, d16, d20, d24, d30, d16_512"),
    ("tokenizer.py:bogus", "tiny, vqvae"),
  ],
)
def test_an_unknown_config_variant_is_named_with_the_valid_ones(spec, valid):
  variant = spec.split(":")[1]
  with pytest.raises(ValueError, match=rf"unknown variant '{variant}'; valid variants: {valid}"):
    _parse(f"--config={CONFIGS}/{spec}")


def test_a_variant_given_to_a_config_without_variants_is_refused(tmp_path):
  (tmp_path / "plain.py").write_text(
    "import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict({'a': 1})\n"
  )
  with pytest.raises(ValueError, match=r"plain\.py' takes no ':variant'"):
    _parse(f"--config={tmp_path}/plain.py:d16")


def test_an_unknown_quick_start_family_is_refused_naming_the_valid_ones():
  with pytest.raises(ValueError, match="unknown quick-start family .d16.; valid: hmar, mar, himar"):
    _parse(f"--config={CONFIGS}/quickstart.py:d16")


@pytest.mark.parametrize(
  "override, message",
  [
    ("trian.num_steps", r"unknown config key config\.trian\.num_steps; did you mean config\.train\.num_steps"),
    ("train.num_stepz", r"unknown config key config\.train\.num_stepz; did you mean config\.train\.num_steps"),
    ("model.dpeth", r"unknown config key config\.model\.dpeth; did you mean config\.model\.depth"),
    ("train.xyzzy", r"unknown config key config\.train\.xyzzy; valid keys in config\.train: batch_size, ema_decay"),
    ("train.num_steps.x", r"config\.train\.num_steps is a value \(int\), not a section"),
    ("mesh.shape[0]", r"config\.mesh\.shape is a tuple, set as a whole"),
  ],
)
def test_an_unknown_override_names_its_full_path_and_the_nearest_keys(override, message):
  with pytest.raises(ValueError, match=message):
    _parse(f"--config={CONFIGS}/hmar.py:tiny", f"--config.{override}=1")


def test_an_override_without_a_config_file_is_refused():
  with pytest.raises(ValueError, match=r"--config\.train\.num_steps needs --config=FILE\.py"):
    _parse("--config.train.num_steps=3")


@pytest.mark.parametrize(
  "args, message",
  [
    ((f"--config={CONFIGS}/hmar.py:tiny", "--config.train.num_steps=abc"), r"--config\.train\.num_steps=abc: invalid"),
    (("--wokdir=x",), r"Unknown command line flag 'wokdir'.*--helpshort"),
  ],
)
def test_a_bad_flag_is_one_message_naming_it(args, message):
  with pytest.raises(cli.CommandLineError, match=message) as info:
    _parse(*args)
  assert "\n" not in str(info.value)


def test_an_error_raised_inside_config_flags_becomes_one_message(tmp_path):
  # An index past the end of a list field gets past the field check and fails in config_flags.
  (tmp_path / "listy.py").write_text(
    "import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict({'xs': [1, 2]})\n"
  )
  with pytest.raises(cli.CommandLineError, match="^IndexError: ") as info:
    _parse(f"--config={tmp_path}/listy.py", "--config.xs[5]=3")
  assert "\n" not in str(info.value)


def test_importing_the_sampling_program_adds_none_of_its_flags_to_other_command_lines():
  # Training imports hmar_jax.sample (as this file does): its --seed or --cfg would be taken, and
  # ignored, by python -m hmar_jax.train.
  assert not [name for name in ("params", "cfg", "top_k", "seed", "out") if name in flags.FLAGS]


def test_the_training_cache_and_quick_start_programs_import_together():
  # Each has a --config flag: defining it on import made the second import fail. The imports are
  # what is tested, so they are made here.
  import hmar_jax.cache_latents
  import hmar_jax.main
  import hmar_jax.train

  assert callable(hmar_jax.main.run_quickstart) and callable(hmar_jax.train.run_task)
  assert callable(hmar_jax.cache_latents.build)


# ----------------------------------------------------------------------------- sample --out


def test_an_output_under_a_file_is_refused_naming_it(tmp_path):
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ValueError, match=r"a_file' is a file, not a folder"):
    check_output_path(str(tmp_path / "a_file" / "sub" / "samples.png"))


def test_an_output_that_is_a_folder_or_has_no_image_extension_is_refused(tmp_path):
  with pytest.raises(ValueError, match="is a folder"):
    check_output_path(str(tmp_path))
  with pytest.raises(ValueError, match="needs an image file extension"):
    check_output_path(str(tmp_path / "samples"))


def test_an_output_in_folders_still_to_be_made_is_accepted_without_making_them(tmp_path):
  check_output_path(str(tmp_path / "new" / "deeper" / "samples.png"))
  assert not (tmp_path / "new").exists()


def test_an_output_in_a_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
  # Permissions cannot stop root (the test may run as root): the probe write itself fails here.
  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr("tempfile.TemporaryFile", refuse)
  with pytest.raises(ValueError, match=r"folder '.*' is not writable \(Permission denied\)"):
    check_output_path(str(tmp_path / "samples.png"))
