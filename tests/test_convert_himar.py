"""Converting whole official Hi-MAR checkpoints (backbone + MLP head + global DiT head).

A fake official checkpoint-last.pth for the 'tiny' Hi-MAR is written the way the official util/misc.py
save_model does: {'model': state_dict, 'model_ema': state_dict, 'args': argparse.Namespace}, from the
PyTorch re-statements tests/torch_ref_himar.py (backbone), tests/torch_ref_diffloss.py (stage-1 head,
keys under 'diffloss.') and tests/torch_ref_dit_head.py (stage-2 head with its two buffers, keys under
'cond_diffloss.'). The converted file, loaded with load_himar, is compared with them: z1 / z2 of the
backbone against the float64 re-statement (atol / rtol 1e-4, as tests/test_himar_backbone.py), the
heads' network outputs against the float64 torch networks (atol / rtol 1e-5 on outputs of order 1).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_ref_diffloss import randomized_torch_diffloss  # noqa: E402
from torch_ref_dit_head import randomized_torch_head  # noqa: E402

from hmar_jax.convert.__main__ import main as convert_main  # noqa: E402
from hmar_jax.convert.common import ConversionError  # noqa: E402
from hmar_jax.convert.himar import (  # noqa: E402
  convert_himar_state_dict,
  himar_entries,
  infer_himar_config,
  infer_himar_variant,
)
from hmar_jax.convert.mar import mar_entries  # noqa: E402
from hmar_jax.models import himar, mar  # noqa: E402
from hmar_jax.models.himar_model import abstract_himar, himar_model_config, load_himar  # noqa: E402
from tests.torch_ref_himar import RefHiMAR  # noqa: E402

Z_TOL = dict(atol=1e-4, rtol=1e-4)
NET_TOL = dict(atol=1e-5, rtol=1e-5)
B = 2
BUFFERS = ("cond_diffloss.net.pos_embed", "cond_diffloss.net.c_pos_embed")

TINY_CONFIG_FILE = """
from hmar_jax.models.himar import himar_config


def get_config():
  return himar_config("tiny")
"""


def tiny():
  return himar.himar_config("tiny")


def torch_himar(config, seed):
  """(RefHiMAR, TorchDiffLoss, TorchGlobalHead), float64, random weights: the official model's three parts."""
  t, d = mar.token_embed_dim(config), config.decoder_embed_dim
  backbone = RefHiMAR(config).randomize(seed).double().eval()
  head1 = randomized_torch_diffloss(t, d, config.diffloss_d, config.diffloss_w, seed=seed)
  head2 = randomized_torch_head(
    seed,
    c=t,
    cz=d,
    depth=config.gdm_d,
    width=config.gdm_w,
    heads=config.head,
    mlp_ratio=float(config.ratio),
    grid=mar.seq_hw(config)[0],
  )
  return backbone, head1.double().eval(), head2.double().eval()


def official_state_dict(backbone, head1, head2) -> dict:
  """The official Hi-MAR state_dict (float32 tensors): backbone keys, 'diffloss.net.*', 'cond_diffloss.net.*'."""
  sd = {k: v.float() for k, v in backbone.state_dict().items()}
  sd.update({f"diffloss.{k}": v.float() for k, v in head1.state_dict().items()})
  sd.update({f"cond_diffloss.{k}": v.float() for k, v in head2.state_dict().items()})
  return sd


def write_official_file(path, sd_model, sd_ema):
  args = argparse.Namespace(model="himar_tiny", cond_scale=2, gdm_d=2, gdm_w=64, head=4, ema_rate=0.9999)
  torch.save({"model": sd_model, "model_ema": sd_ema, "args": args, "epoch": 3}, path)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """The file, its tiny config file, and the torch modules of 'model' (seed 1) and 'model_ema' (seed 2)."""
  root = tmp_path_factory.mktemp("official")
  raw, ema = torch_himar(tiny(), 1), torch_himar(tiny(), 2)
  write_official_file(root / "checkpoint-last.pth", official_state_dict(*raw), official_state_dict(*ema))
  (root / "himar_tiny.py").write_text(TINY_CONFIG_FILE)
  return {"src": root / "checkpoint-last.pth", "config": str(root / "himar_tiny.py"), "model": raw, "model_ema": ema}


@pytest.fixture(scope="module")
def converted_ema(official, tmp_path_factory):
  dst = tmp_path_factory.mktemp("converted") / "himar"
  assert convert_main(["himar", str(official["src"]), str(dst), "--config", official["config"]]) == 0
  return load_himar(dst)


@functools.partial(nnx.jit, static_argnames=("capacity",))
def run_stage1(backbone, low, mask, labels, *, capacity):
  return backbone.stage1(low, mask, labels, capacity=capacity)


@functools.partial(nnx.jit, static_argnames=("capacity",))
def run_stage2(backbone, high, mask, labels, pivots, placeholder, *, capacity):
  return backbone.stage2(high, mask, labels, pivots=pivots, placeholder=placeholder, capacity=capacity)


def masks(n, num_masked, rng):
  mask = np.zeros((B, n), np.float32)
  for r in range(B):
    mask[r, rng.permutation(n)[:num_masked]] = 1.0
  return mask


def stages_of(model, ref, seed):
  """[(JAX, torch) z1, (JAX, torch) z2] for one random batch: 3 of 4 low-res tokens masked in stage 1;
  stage 2 with 10 of 16 high-res tokens masked, z1 as pivots and random placeholder slots."""
  c = tiny()
  s, n, t = himar.low_res_len(c), himar.high_res_len(c), mar.token_embed_dim(c)
  rng = np.random.default_rng(seed)
  low = rng.standard_normal((B, s, c.cond_dim)).astype(np.float32)
  high = rng.standard_normal((B, n, t)).astype(np.float32)
  labels = rng.integers(0, c.class_num, B)
  mask1, mask2 = masks(s, 3, rng), masks(n, 10, rng)
  placeholder = rng.random((B, s)) < 0.5
  z1 = np.asarray(run_stage1(model.backbone, low, mask1, labels, capacity=c.buffer_size + s))
  z2 = np.asarray(run_stage2(model.backbone, high, mask2, labels, z1, placeholder, capacity=c.buffer_size + s + n))
  d = lambda x: torch.from_numpy(np.array(x)).double()  # noqa: E731
  with torch.no_grad():
    want1 = ref.stage1(d(low), d(high), d(mask1), torch.from_numpy(labels).long()).numpy()
    want2 = ref.stage2(d(high), d(mask2), torch.from_numpy(labels).long(), pivots=d(z1), placeholder=d(placeholder))
  return [(z1, want1), (z2, want2.numpy())]


def heads_of(model, head1, head2, seed):
  """[(JAX, torch) MLP-head output (N, 2C), (JAX, torch) DiT output (N, L, C)] on random inputs."""
  c = tiny()
  t, d, side = mar.token_embed_dim(c), c.decoder_embed_dim, mar.seq_hw(c)[0]
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((8, t)).astype(np.float32)
  steps = rng.integers(0, 1000, 8)
  z = rng.standard_normal((8, d)).astype(np.float32)
  got1 = np.asarray(model.diffloss.net(x, steps, z))
  xs = rng.standard_normal((B, side * side, t)).astype(np.float32)
  zs = rng.standard_normal((B, side * side, d)).astype(np.float32)
  got2 = np.asarray(model.cond_diffloss.net(xs, steps[:B], zs))
  nchw = lambda a: torch.from_numpy(a.reshape(B, side, side, -1).transpose(0, 3, 1, 2).copy()).double()  # noqa: E731
  with torch.no_grad():
    want1 = head1.net(torch.from_numpy(x).double(), torch.from_numpy(steps), torch.from_numpy(z).double()).numpy()
    want2 = head2.net(nchw(xs), torch.from_numpy(steps[:B]), None, nchw(zs)).numpy()
  return [(got1, want1), (got2, want2.transpose(0, 2, 3, 1).reshape(B, side * side, t))]


# ----------------------------------------------------------------------------- the whole model


def test_the_plan_and_the_global_head_buffers_cover_every_official_key_once_with_its_shape():
  want = {k: tuple(v.shape) for k, v in official_state_dict(*torch_himar(tiny(), 0)).items()}
  plan = himar_entries(tiny())
  got = {e.source_key: tuple(e.source_shape) for e in plan}
  assert len(plan) == len(got) == len(want) - len(BUFFERS)
  assert got == {k: v for k, v in want.items() if k not in BUFFERS}


def test_the_cli_converts_the_ema_weights_and_both_stages_match_the_restatement(official, converted_ema):
  for got, want in stages_of(converted_ema, official["model_ema"][0], seed=0):
    np.testing.assert_allclose(got, want, **Z_TOL)


def test_the_converted_heads_match_the_restatement(official, converted_ema):
  for got, want in heads_of(converted_ema, *official["model_ema"][1:], seed=1):
    np.testing.assert_allclose(got, want, **NET_TOL)


def test_no_ema_converts_the_raw_weights(official, tmp_path):
  dst = tmp_path / "raw"
  assert convert_main(["himar", str(official["src"]), str(dst), "--config", official["config"], "--no_ema"]) == 0
  model = load_himar(dst)
  backbone, head1, head2 = official["model"]
  for got, want in stages_of(model, backbone, seed=2):
    np.testing.assert_allclose(got, want, **Z_TOL)
  for got, want in heads_of(model, head1, head2, seed=3):
    np.testing.assert_allclose(got, want, **NET_TOL)


def _edited_file(official, tmp_path, edit):
  sd = official_state_dict(*official["model_ema"])
  edit(sd)
  src = tmp_path / "edited.pth"
  write_official_file(src, sd, sd)
  return src


@pytest.mark.parametrize(
  "edit, message, key",
  [
    (
      lambda sd: sd.pop("cond_diffloss.net.blocks.1.mlp.fc2.bias"),
      "missing 1 key",
      "cond_diffloss.net.blocks.1.mlp.fc2.bias",
    ),
    (lambda sd: sd.__setitem__("cond_diffloss.net.extra.weight", torch.zeros(3)), "unexpected 1 key", "extra.weight"),
    (lambda sd: sd.pop("diffloss.net.input_proj.bias"), "missing 1 key", "diffloss.net.input_proj.bias"),
    (lambda sd: sd.pop("cond_diffloss.net.pos_embed"), "missing buffer", "cond_diffloss.net.pos_embed"),
  ],
  ids=["missing", "unexpected", "missing-stage1-head", "missing-buffer"],
)
def test_a_checkpoint_with_a_missing_or_extra_key_is_refused_naming_it_and_nothing_is_written(
  official, tmp_path, capsys, edit, message, key
):
  src = _edited_file(official, tmp_path, edit)
  dst = tmp_path / "out"
  assert convert_main(["himar", str(src), str(dst), "--config", official["config"]]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and key in err
  assert not dst.exists()


def test_an_existing_destination_is_refused_before_reading_the_source(tmp_path, capsys):
  dst = tmp_path / "exists"
  dst.mkdir()
  assert convert_main(["himar", str(tmp_path / "no_such.pth"), str(dst)]) == 2
  assert "already exists" in capsys.readouterr().err


def test_a_width_of_no_official_variant_needs_a_config(official, tmp_path, capsys):
  assert convert_main(["himar", str(official["src"]), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "width 64 is none of the official Hi-MAR widths" in err and "--config" in err
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- architecture from shapes


def shapes_only(config) -> dict:
  """{official key: zero-stride array of the right shape} (no memory for the big variants)."""
  sd = {e.source_key: np.broadcast_to(np.float32(0), e.source_shape) for e in himar_entries(config)}
  for key in BUFFERS:
    sd[key] = np.broadcast_to(np.float32(0), (1, himar.high_res_len(config), config.gdm_w))
  return sd


@pytest.mark.parametrize("variant", ["base", "large", "huge"])
def test_the_official_variants_are_recognised_from_their_shapes(variant):
  sd = shapes_only(himar.himar_config(variant))
  assert infer_himar_variant(sd) == variant
  assert infer_himar_config(sd).to_dict() == himar_model_config(himar.himar_config(variant)).to_dict()


def test_the_shapes_give_grids_buffer_classes_and_head_sizes_of_a_custom_model():
  c = himar.himar_config("large")
  c.update(img_size=512, cond_scale=4, buffer_size=32, class_num=17, diffloss_d=3, diffloss_w=96, gdm_d=3, ratio=2)
  got = infer_himar_config(shapes_only(c))
  assert got.to_dict() == himar_model_config(c).to_dict()
  assert infer_himar_variant(shapes_only(c)) is None


def test_a_mar_state_dict_is_refused_as_not_himar_naming_what_it_looks_like():
  sd = {e.source_key: np.broadcast_to(np.float32(0), e.source_shape) for e in mar_entries(mar.mar_config("base"))}
  with pytest.raises(ConversionError, match=r"not a Hi-MAR checkpoint.*'cond_tokens'.*MAR checkpoint.*convert mar"):
    infer_himar_config(sd)


def test_a_state_dict_without_the_global_head_is_refused_by_the_inference():
  sd = {k: v for k, v in shapes_only(himar.himar_config("base")).items() if not k.startswith("cond_diffloss.")}
  with pytest.raises(ConversionError, match=r"no 'cond_diffloss.net.\*' keys"):
    infer_himar_config(sd)


def test_the_converted_state_fills_every_parameter_of_the_model():
  c = tiny()
  rng = np.random.default_rng(0)
  sd = {k: v.numpy() for k, v in official_state_dict(*torch_himar(c, 3)).items()}
  sd["mask_token"] = rng.standard_normal(sd["mask_token"].shape).astype(np.float32)
  state = convert_himar_state_dict(sd, c)
  want = nnx.state(abstract_himar(c), nnx.Param)
  assert {tuple(p) for p, _ in nnx.to_flat_state(state)} == {tuple(p) for p, _ in nnx.to_flat_state(want)}
  flat = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
  np.testing.assert_array_equal(flat[("backbone", "mask_token")], sd["mask_token"])
  np.testing.assert_array_equal(
    flat[("cond_diffloss", "net", "final_layer", "linear", "kernel")],
    sd["cond_diffloss.net.final_layer.linear.weight"].T,
  )
