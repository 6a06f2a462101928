"""Model configs (ml_collections) for VAR / HMAR; the files under configs/ call `model_config`.

Official hyper-parameters (HMAR models/__init__.py build_vae_nsp / build_vae_hmar, VAR
build_vae_var): width = 64 * depth, heads = depth (head dim 64), MLP ratio 4, drop path
0.1 * depth / 24, class dropout 0.1, LayerNorm eps 1e-6, attn_l2_norm on, no shared adaLN,
init_adaln 0.5, init_head 0.02, init_std automatic (sqrt(1 / 3C)). init_adaln_gamma follows the
official training configs (config/experiment/hmar-train-d*.yaml `alng`: 1e-3 for d16 and d20, 1e-4
for d24, 1e-5 for d30; the argument default is 1e-5). mask_layers = official n_layers_train = 8 for HMAR, 0 (no masked branch) for VAR.
"""

from __future__ import annotations

import ml_collections

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def model_config(
  depth: int,
  *,
  kind: str = "hmar",
  patch_nums=PATCH_NUMS_256,
  width: int | None = None,
  num_heads: int | None = None,
  vocab_size: int = 4096,
  cvae: int = 32,
  num_classes: int = 1000,
  mask_layers: int | None = None,
) -> ml_collections.ConfigDict:
  """The `config.model` block for `hmar_jax.models.ScaleTransformer`.

  kind: 'hmar' (pattern block_diagonal, masked branch of min(8, depth) blocks) or 'var'
  (pattern block_causal, no masked branch).
  """
  if kind not in ("hmar", "var"):
    raise ValueError(f"kind must be 'hmar' or 'var', got {kind!r}")
  m = ml_collections.ConfigDict()
  m.kind = kind
  m.depth = depth
  m.width = 64 * depth if width is None else width
  m.num_heads = depth if num_heads is None else num_heads
  m.mlp_ratio = 4.0
  m.patch_nums = tuple(patch_nums)
  m.vocab_size = vocab_size
  m.cvae = cvae
  m.num_classes = num_classes
  m.pattern = "block_diagonal" if kind == "hmar" else "block_causal"
  m.mask_layers = (min(8, depth) if kind == "hmar" else 0) if mask_layers is None else mask_layers
  m.attn_l2_norm = True
  m.norm_eps = 1e-6
  m.drop_path_rate = 0.1 * depth / 24
  m.cond_drop_rate = 0.1
  m.attn_implementation = "auto"  # pallas_kernels.scale_attention implementation
  m.dtype = "float32"  # compute dtype ('bfloat16' for mixed precision)
  m.param_dtype = "float32"
  m.scan_layers = False  # True: blocks stacked on a 'layers' axis and run by one jax.lax.scan
  # what a block keeps for the backward pass: none | full | dots | dots_no_batch | dots_and_inputs,
  # or auto (training: none when the compiled step fits in device memory, else dots)
  m.remat_policy = "none"
  m.init_std = -1.0  # < 0: sqrt(1 / 3C)
  m.init_head = 0.02
  m.init_adaln = 0.5
  m.init_adaln_gamma = 1e-3 if depth <= 20 else (1e-4 if depth <= 24 else 1e-5)
  return m


def upgrade_model_config(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Brings a stored model config (checkpoint metadata) up to the current fields.

  Earlier checkpoints stored `remat: bool` instead of `remat_policy` and had no `scan_layers`.
  """
  m = ml_collections.ConfigDict(m.to_dict() if isinstance(m, ml_collections.ConfigDict) else dict(m))
  if "remat" in m:
    remat = bool(m.remat)
    del m["remat"]
    m.remat_policy = "full" if remat else "none"
  if "remat_policy" not in m:
    m.remat_policy = "none"
  if "scan_layers" not in m:
    m.scan_layers = False
  m.patch_nums = tuple(m.patch_nums)
  return m


def tiny_model_config(kind: str = "hmar") -> ml_collections.ConfigDict:
  """A CPU-sized model matching configs/vqvae.py:tiny (patch_nums 1,2,3,5,8, V 64, Cvae 8)."""
  return model_config(
    2,
    kind=kind,
    patch_nums=(1, 2, 3, 5, 8),
    width=64,
    num_heads=2,
    vocab_size=64,
    cvae=8,
    num_classes=10,
    mask_layers=1 if kind == "hmar" else 0,
  )
