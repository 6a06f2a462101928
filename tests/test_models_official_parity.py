"""Parity with the official PyTorch modules themselves (VAR models/var.py, HMAR models/hmar.py).

The official sources are read from the directory named by $HMAR_OFFICIAL_SRC, which must hold the
two repositories as VAR/ (FoundationVision/VAR, with VAR/models/var.py) and HMAR/ (NVlabs/HMAR,
with HMAR/models/hmar.py), at the commits these tests were checked against (HOW_TO_GET_THEM below);
the tests are skipped, saying how to get them, where it is unset or they are absent.
Each check runs in a subprocess, because both repositories are imported as the top-level packages
`models`, `utils`, `dist`. Official modules are built at a tiny size with
random weights; their own `state_dict()` must convert with full key coverage and give the same
logits (VAR: the teacher-forced forward; HMAR: every next-scale and masked step as generate()
runs it, with the official blocks and heads).

The PyTorch re-statements of the official forward (tests/test_convert_transformers.py and others)
need no official sources and run wherever torch is installed (requirements-test.txt).
"""

import os
import subprocess
import sys
import textwrap

import pytest

OFFICIAL_SRC_ENV = "HMAR_OFFICIAL_SRC"
HMAR_COMMIT = "595a9df03a9df8152c7b50d96204d76cdd6dc244"
VAR_COMMIT = "78b95394fc5896192e3a003e4b295f8ea743c48f"
HOW_TO_GET_THEM = (
  f"git clone https://github.com/NVlabs/HMAR SRC/HMAR && git -C SRC/HMAR checkout {HMAR_COMMIT}; "
  f"git clone https://github.com/FoundationVision/VAR SRC/VAR && git -C SRC/VAR checkout {VAR_COMMIT}; "
  f"then export {OFFICIAL_SRC_ENV}=SRC (SRC: any directory)"
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = textwrap.dedent("""
  import os, sys, types
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, REPO_DIR); sys.path.insert(1, ROOT)
  import numpy as np, torch, torch.nn as nn
  import jax; jax.config.update("jax_default_matmul_precision", "highest")
  import jax.numpy as jnp
  from hmar_jax.models import model_config
  class FakeVAE:  # the transformers read only Cvae, vocab_size and quantize from it
    Cvae = 8; vocab_size = 48; quantize = None
  PN, C = (1, 2, 3, 4), 128
  torch.manual_seed(0)
  def randomize(module):  # the official init makes gates tiny; random weights test everything
    with torch.no_grad():
      for n, p in module.named_parameters():
        p.copy_(0.1 * torch.randn_like(p) + (np.log(4.0) if "scale_mul" in n else 0.0))
    return module.eval()
""")

VAR_SCRIPT = COMMON + textwrap.dedent("""
  hf = types.ModuleType("huggingface_hub"); hf.PyTorchModelHubMixin = object
  sys.modules["huggingface_hub"] = hf
  from models.var import VAR
  from hmar_jax.convert.var import convert_var_state_dict
  var = randomize(VAR(FakeVAE(), num_classes=10, depth=3, embed_dim=C, num_heads=2, attn_l2_norm=True,
                      patch_nums=PN, cond_drop_rate=0.0, flash_if_available=False, fused_if_available=False,
                      drop_path_rate=0.1))
  sd = {k: v.detach().numpy() for k, v in var.state_dict().items()}
  m = model_config(3, kind="var", patch_nums=PN, width=C, num_heads=2, vocab_size=48, cvae=8, num_classes=10)
  m.attn_implementation = "xla"
  model = convert_var_state_dict(sd, m)
  labels, x = torch.tensor([3, 10]), torch.randn(2, 29, 8)
  with torch.no_grad():
    want = var(labels, x).numpy()
  got = np.asarray(model.nsp_logits(jnp.asarray(labels.numpy()), jnp.asarray(x.numpy())))
  np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)
  assert np.abs(want).max() > 1.0
  print("OK")
""")

HMAR_SCRIPT = COMMON + textwrap.dedent("""
  attn_pkg = types.ModuleType("attn"); attn_pkg.__path__ = []
  bsa = types.ModuleType("attn.block_sparse_attn_interface")
  class BlockSparseAttention(nn.Module):  # the Triton kernel; generate() does not use it
    def __init__(self, *a, **k): super().__init__()
  bsa.BlockSparseAttention = BlockSparseAttention
  utils_pkg = types.ModuleType("utils"); utils_pkg.__path__ = []
  misc = types.ModuleType("utils.misc")   # the real one imports wandb
  misc.does_not_contain_substrings = lambda s, subs: all(x not in s for x in subs)
  sys.modules.update({"attn": attn_pkg, "attn.block_sparse_attn_interface": bsa, "utils": utils_pkg,
                      "utils.misc": misc})
  from models.hmar import HMAR
  from hmar_jax.convert.hmar import convert_hmar_state_dict
  h = randomize(HMAR(FakeVAE(), num_classes=10, depth=3, embed_dim=C, num_heads=2, attn_l2_norm=True,
                     patch_nums=PN, cond_drop_rate=0.0, flash_if_available=False, fused_if_available=False,
                     n_layers_train=2))
  sd = {k: v.detach().numpy() for k, v in h.state_dict().items()}
  m = model_config(3, kind="hmar", patch_nums=PN, width=C, num_heads=2, vocab_size=48, cvae=8,
                   num_classes=10, mask_layers=2)
  m.attn_implementation = "xla"
  model = convert_hmar_state_dict(sd, m)
  labels = torch.tensor([3, 10]); jl = jnp.asarray(labels.numpy())
  bounds = [0, 1, 5, 14, 30]
  with torch.no_grad():
    cond = h.class_emb(labels)
    lvl_pos = h.lvl_embed(h.lvl_1L) + h.pos_1LC
    for si in range(4):
      b, e = bounds[si], bounds[si + 1]
      inp = torch.randn(2, e - b, 8)
      # next-scale step as HMAR.generate builds it
      x = cond.unsqueeze(1) + h.pos_start + lvl_pos[:, :1] if si == 0 else (
          h.word_embed(inp) + h.word_embed_bias + lvl_pos[:, b:e])
      for blk in list(h.base_blocks) + list(h.ns_blocks):
        x = blk(x=x, cond_BD=cond, using_block_sparse_attn=False, attn_bias=None)
      want = h.get_ns_logits(x, cond).numpy()
      got = model.nsp_scale_logits(si, jl, None if si == 0 else jnp.asarray(inp.numpy()))
      np.testing.assert_allclose(np.asarray(got), want, atol=5e-5, rtol=1e-4)
      if si == 0:
        continue
      # masked step as HMAR.generate builds it: masked tokens -> mask_embed, plus W f_hat + bias
      f_prev, mask = torch.randn(2, e - b, 8), torch.rand(2, e - b) < 0.5
      tok = torch.where(mask[..., None], h.mask_embed(torch.tensor(0)), h.word_embed(inp))
      x = h.word_embed(f_prev) + tok + h.word_embed_bias + lvl_pos[:, b:e]
      for blk in list(h.base_blocks) + list(h.mask_blocks):
        x = blk(x=x, cond_BD=cond, using_block_sparse_attn=False, attn_bias=None)
      want = h.get_mask_logits(x, cond).numpy()
      got = model.mp_scale_logits(si, jl, jnp.asarray(f_prev.numpy()), jnp.asarray(inp.numpy()),
                                  jnp.asarray(mask.numpy()))
      np.testing.assert_allclose(np.asarray(got), want, atol=5e-5, rtol=1e-4)
  print("OK")
""")


def official_repo(name, module):
  """The official repository `name` under $HMAR_OFFICIAL_SRC; skips the test when it is not there."""
  src = os.environ.get(OFFICIAL_SRC_ENV)
  if not src:
    pytest.skip(f"{OFFICIAL_SRC_ENV} is not set; to run the official-parity tests: {HOW_TO_GET_THEM}")
  repo_dir = os.path.join(src, name)
  if not os.path.isfile(os.path.join(repo_dir, "models", module)):
    pytest.skip(f"{repo_dir}/models/{module} not found; to get the official sources: {HOW_TO_GET_THEM}")
  return repo_dir


def run_script(repo_dir, script):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  header = f"REPO_DIR = {repo_dir!r}\nROOT = {ROOT!r}\n"
  out = subprocess.run(
    [sys.executable, "-c", header + script], cwd=repo_dir, env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def test_official_var_module_state_dict_converts_and_gives_the_same_logits():
  run_script(official_repo("VAR", "var.py"), VAR_SCRIPT)


def test_official_hmar_module_state_dict_converts_and_every_step_matches():
  run_script(official_repo("HMAR", "hmar.py"), HMAR_SCRIPT)


@pytest.mark.parametrize("value", [None, "empty dir"])
def test_without_the_official_sources_the_skip_says_how_to_get_them(monkeypatch, tmp_path, value):
  if value is None:
    monkeypatch.delenv(OFFICIAL_SRC_ENV, raising=False)
  else:
    monkeypatch.setenv(OFFICIAL_SRC_ENV, str(tmp_path))
  with pytest.raises(pytest.skip.Exception) as skipped:
    official_repo("HMAR", "hmar.py")
  message = str(skipped.value)
  for part in (
    f"git clone https://github.com/NVlabs/HMAR SRC/HMAR && git -C SRC/HMAR checkout {HMAR_COMMIT}",
    "git clone https://github.com/FoundationVision/VAR SRC/VAR",
    f"export {OFFICIAL_SRC_ENV}=SRC",
  ):
    assert part in message
