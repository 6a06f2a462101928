"""Times the official HMAR PyTorch next-scale train step (NVlabs/HMAR), for comparison.

Run in its own process (PyTorch and JAX would both claim the GPU). The official sources are
read from --ref_dir, a copy of the needed NVlabs/HMAR files with the repository's layout
(`dist.py`, `trainer.py`, `models/`, `attn/`, `utils/{__init__,amp_sc,lr_control}.py`,
`config/experiment/hmar-train-d*.yaml`; see bench/wheels.txt); they are not part of this
repository.

What runs, per setting depth:resolution:batch:
  * model: `models.build_vae_nsp` exactly as `train.py` calls it (width 64 * depth, heads =
    depth, drop path 0.1 * depth / 24, L2-normalised attention, the block-sparse Triton kernel of
    `attn/`), random init with the initialisation multipliers of `utils/arg_util.py` (Args)
    overridden by `config/experiment/hmar-train-d{depth}.yaml` (the d16 file for depths without
    one). The VQVAE is built too (the builder makes it and `trainer.Trainer` takes it) and stays
    on the device as in official training, but it is not run: the step gets random token indices
    (B, L), random teacher-forcing inputs (B, L - 1, 32) and random labels (B,).
  * optimiser: `utils.lr_control.filter_params` groups, `torch.optim.AdamW(betas=(0.9, 0.95),
    fused=True)` inside `utils.amp_sc.AmpOptimizer` (fp16 autocast, GradScaler at 2**11, clip
    2.0), learning rate and weight decay (0.05) set by `utils.lr_control.lr_wd_annealing` at the
    end of warm-up, as `train.py` builds them.
  * loss: `trainer.Trainer` with the yaml's `reweight_loss: True, loss_reweight_type: lognorm`
    (per-token weights from `Trainer.norm_dist_equivalent`), `CrossEntropyLoss(reduction='none')`.
  * step: the body of `nsp_trainer.NextScaleTrainer.train_step` with stepping=True, re-stated in
    `train_step` below (nsp_trainer.py itself imports wandb/torchvision loggers through
    `utils.misc`, absent on the GPU image): forward under the AMP context, weighted loss,
    `AmpOptimizer.backward_clip_step` (GradScaler backward, unscale, clip_grad_norm_ 2.0, fused
    AdamW step, scaler update, zero_grad), then the argmax the official step takes every step.
  * timing: `--warmup` steps (the first one timed on its own: Triton compile), then the median of
    `--steps` steps, each between two `torch.cuda.synchronize()` calls. Memory: peak of
    `torch.cuda.max_memory_allocated()` over build and steps, reset per setting.

The official `models/mp.py` and `models/hmar.py` (imported by `models/__init__.py`) take one
string helper from `utils.misc`, whose module imports wandb, pytz and torchvision; the script
registers a stand-in `utils.misc` with just that helper before importing `models`.

FLOP model (per train step; the same as the shared official anchor figures, `--check_flops`
verifies it): with C = 64 * depth, B images of L tokens, V = 4096, Cvae = 32,
  n_tok_params  = depth * (3 C^2 [qkv] + C^2 [proj] + 2 * 4 C^2 [fc1, fc2]) + C V [head]
                  + Cvae C [word_embed]  (weights of the matmuls applied to every token),
  n_adaln_params = depth * 6 C^2 + 2 C^2  (the adaLN projections of the blocks and the head,
                  which act on the class embedding, so once per image),
  pairs         = sum over scales of pn^4  (query-key pairs the block-diagonal mask keeps),
  matmul_flops  = 6 * (n_tok_params * B * L + n_adaln_params * B)  (forward 2, backward 4),
  attn_flops    = 12 * depth * C * pairs * B  (QK^T and PV, 2 C per pair each, times 3),
  total_flops   = matmul_flops + attn_flops;  mfu = total_flops / (step time * peak),
  naive_flops   = 6 * (n_tok_params + n_adaln_params) * B * L + attn_flops (adaLN per token).
Biases, norms, embeddings lookups, softmax and the optimiser are not counted. The default peak,
989e12 FLOP/s, is the H100/H200 SXM dense fp16/bf16 tensor figure as the datasheet rounds it
(1979e12 with sparsity); the shared anchors' MFU values were computed with it (989.5e12 would
give 0.1339 instead of their 0.134 for d16 at 512 px). The JSON records the peak used.

Debugging without a GPU: `--device cpu` (or `--tiny`: depth 2, 256 px, batch 2, 2 steps after 1 warm-up)
runs in float32 without AMP (the official AMP context hard-codes CUDA) and, because the official
Triton kernel neither runs on the CPU nor in Triton's interpreter, through the official model's
own non-kernel path (`using_block_sparse_attn=False`: SDPA with the same block-diagonal
`attn_bias`). Such rows say `"smoke_test": true`; their times mean nothing.

  python bench/official_train_step_torch.py --ref_dir .whl/official_hmar --out official_train.json
  python bench/official_train_step_torch.py --ref_dir .whl/official_hmar --out tiny.json --tiny
  python bench/official_train_step_torch.py --ref_dir .whl/official_hmar --check_flops
"""

from __future__ import annotations

import os

# The official kernel reads module-level floats inside @triton.jit; Triton 3.6 refuses that
# unless this is set before the kernel module is imported.
os.environ["TRITON_ALLOW_NON_CONSTEXPR_GLOBALS"] = "1"

import argparse  # noqa: E402
import builtins  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402

PATCH_NUMS = {  # utils/arg_util.py: --pn 256 / 512 / 1024
  256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
  512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
  1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
VOCAB, CVAE, NUM_CLASSES, PATCH_SIZE = 4096, 32, 1000, 16
IMAGENET_TRAIN_IMAGES = 1281167  # only sets the learning-rate schedule's position
DEFAULT_PEAK_FLOPS = 989e12

# utils/arg_util.py Args defaults that the train step depends on; the experiment yaml overrides.
ARGS_DEFAULTS = dict(
  reweight_loss=False,
  loss_reweight_type="lognorm",
  ini=-1.0,
  hd=0.02,
  aln=0.5,
  alng=1e-5,
  fp16=0,
  tblr=1e-4,
  twd=0.05,
  twde=0.0,
  tclip=2.0,
  ls=0.0,
  bs=768,
  ac=1,
  ep=250,
  wp=0.0,
  wp0=0.005,
  wpe=0.01,
  sche="lin0",
  opt="adamw",
  afuse=True,
  saln=False,
  anorm=True,
  fuse=True,
  tf32=True,
  seed=42,
)

# The `flops` fields of the shared official anchor file (one H200, 2026-11-30), and its
# parameter counts; --check_flops compares the FLOP model against them.
ANCHOR_FLOPS = {
  (16, 256, 64): dict(
    params=310283520,
    n_tok_params=205553664,
    n_adaln_params=102760448,
    pairs_per_image=110468,
    seq_len=680,
    tokens_per_step=43520,
    matmul_flops=53713632755712,
    attn_flops=1390009122816,
    total_flops=55103641878528,
    naive_flops=81896990048256,
  ),
  (24, 256, 32): dict(
    params=1033399360,
    n_tok_params=685817856,
    n_adaln_params=344457216,
    pairs_per_image=110468,
    seq_len=680,
    tokens_per_step=21760,
    matmul_flops=89606515064832,
    attn_flops=1563760263168,
    total_flops=91170275328000,
    naive_flops=136076473663488,
  ),
  (16, 512, 16): dict(
    params=311880960,
    n_tok_params=205553664,
    n_adaln_params=102760448,
    pairs_per_image=1522100,
    seq_len=2240,
    tokens_per_step=35840,
    matmul_flops=44212124909568,
    attn_flops=4788112588800,
    total_flops=49000237498368,
    naive_flops=71087979233280,
  ),
}
ANCHOR_MS = {(16, 256, 64): 338.349, (24, 256, 32): 432.89, (16, 512, 16): 369.858}
ANCHOR_MFU = {(16, 256, 64): 0.1647, (24, 256, 32): 0.213, (16, 512, 16): 0.134}


def parse_settings(text: str) -> list[tuple[int, int, int]]:
  """'d16:256:64,d24:256:32' -> [(16, 256, 64), (24, 256, 32)] as (depth, resolution, batch)."""
  out = []
  for item in text.split(","):
    depth, res, batch = item.strip().split(":")
    depth, res, batch = int(depth.lstrip("d")), int(res), int(batch)
    if res not in PATCH_NUMS:
      raise SystemExit(f"error: resolution {res} not one of {sorted(PATCH_NUMS)}")
    out.append((depth, res, batch))
  return out


def flop_model(
  depth: int, patch_nums: tuple[int, ...], batch: int, vocab: int = VOCAB, cvae: int = CVAE, mlp_ratio: float = 4.0
) -> dict:
  """FLOPs of one next-scale train step of the official model (see the module docstring).

  Args:
    depth: number of blocks; width is 64 * depth (models.build_vae_nsp).
    patch_nums: side of each scale's token map; L = sum(pn^2).
    batch: images per step.
    vocab, cvae, mlp_ratio: head size, teacher-input channels, FFN expansion.

  Returns:
    dict of ints: n_tok_params, n_adaln_params, pairs_per_image, seq_len, tokens_per_step,
    matmul_flops, attn_flops, total_flops, naive_flops.
  """
  c = 64 * depth
  hidden = round(c * mlp_ratio)
  seq = sum(p * p for p in patch_nums)
  pairs = sum(p**4 for p in patch_nums)
  n_tok = depth * (3 * c * c + c * c + 2 * c * hidden) + c * vocab + cvae * c
  n_adaln = depth * 6 * c * c + 2 * c * c
  tokens = batch * seq
  attn = 12 * depth * c * pairs * batch
  matmul = 6 * (n_tok * tokens + n_adaln * batch)
  return dict(
    n_tok_params=n_tok,
    n_adaln_params=n_adaln,
    pairs_per_image=pairs,
    seq_len=seq,
    tokens_per_step=tokens,
    matmul_flops=matmul,
    attn_flops=attn,
    total_flops=matmul + attn,
    naive_flops=6 * (n_tok + n_adaln) * tokens + attn,
  )


def counts_from_model(nsp) -> dict:
  """n_tok_params / n_adaln_params read off a built official NextScalePrediction's modules."""
  n_tok = nsp.word_embed.weight.numel() + nsp.head.weight.numel()
  n_adaln = nsp.head_nm.ada_lin[-1].weight.numel()
  for b in nsp.blocks:
    n_tok += sum(m.weight.numel() for m in (b.attn.mat_qkv, b.attn.proj, b.ffn.fc1, b.ffn.fc2))
    n_adaln += b.ada_lin[-1].weight.numel()
  return dict(n_tok_params=n_tok, n_adaln_params=n_adaln)


def import_official(ref_dir: str, device: str) -> types.SimpleNamespace:
  """Imports the official modules from ref_dir (a copy of NVlabs/HMAR with its layout).

  Args:
    ref_dir: folder holding dist.py, trainer.py, models/, attn/, utils/.
    device: 'cuda' or 'cpu'; on 'cpu' the block-sparse module is built on the CPU (its default
      device is CUDA), since the CPU path never calls the kernel.

  Returns:
    namespace with the official callables used here.
  """
  sys.path.insert(0, os.path.abspath(ref_dir))
  import utils  # pylint: disable=import-outside-toplevel  # the official utils package

  # Stand-in for utils.misc (its module imports wandb, pytz, torchvision and tap): the model
  # files use only this helper from it.
  misc = types.ModuleType("utils.misc")

  def does_not_contain_substrings(main_string, substrings):
    return not any(s in main_string for s in substrings)

  misc.does_not_contain_substrings = does_not_contain_substrings
  sys.modules["utils.misc"] = misc
  utils.misc = misc

  # pylint: disable=import-outside-toplevel
  import dist
  import models
  import models.transformer_blocks as blocks_mod
  import trainer as trainer_mod
  from utils.amp_sc import AmpOptimizer
  from utils.lr_control import filter_params, lr_wd_annealing

  # pylint: enable=import-outside-toplevel
  if device == "cpu":
    blocks_mod.BlockSparseAttention = functools.partial(blocks_mod.BlockSparseAttention, device="cpu")
  return types.SimpleNamespace(
    dist=dist,
    build_vae_nsp=models.build_vae_nsp,
    Trainer=trainer_mod.Trainer,
    AmpOptimizer=AmpOptimizer,
    filter_params=filter_params,
    lr_wd_annealing=lr_wd_annealing,
  )


@contextlib.contextmanager
def quiet_official_print():
  """Silences print inside the block.

  The official code calls print(..., force=True), a keyword that utils.misc's distributed setup
  patches into print; filter_params uses it to dump the parameter groups.
  """
  orig = builtins.print
  builtins.print = lambda *a, **k: None
  try:
    yield
  finally:
    builtins.print = orig


def experiment_hparams(ref_dir: str, depth: int) -> dict:
  """Args defaults overridden by config/experiment/hmar-train-d{depth}.yaml, plus derived values.

  Mirrors utils/arg_util.py init_dist_and_get_args for one process: tlr = ac * tblr * bs / 256
  (bs: the yaml's global batch), twde = twde or twd, wp = ep / 50 when 0.
  """
  import yaml  # pylint: disable=import-outside-toplevel

  hp = dict(ARGS_DEFAULTS)
  folder = os.path.join(ref_dir, "config", "experiment")
  name = f"hmar-train-d{depth}.yaml"
  if not os.path.exists(os.path.join(folder, name)):
    name = "hmar-train-d16.yaml"
  with open(os.path.join(folder, name)) as f:
    raw = yaml.safe_load(f)
  for k, v in raw.items():
    if k in hp:
      hp[k] = v if isinstance(hp[k], (bool, str)) else type(hp[k])(float(v))
  hp["tlr"] = hp["ac"] * hp["tblr"] * hp["bs"] / 256
  hp["twde"] = hp["twde"] or hp["twd"]
  if hp["wp"] == 0:
    hp["wp"] = hp["ep"] / 50
  hp["yaml"] = name
  return hp


def set_torch_flags(hp: dict) -> None:
  """utils/arg_util.py _set_tf32 and _seed_everything(seed, benchmark=True)."""
  torch.backends.cudnn.enabled = True
  torch.backends.cudnn.benchmark = True
  torch.backends.cudnn.deterministic = True
  if torch.cuda.is_available():
    torch.backends.cudnn.allow_tf32 = bool(hp["tf32"])
    torch.backends.cuda.matmul.allow_tf32 = bool(hp["tf32"])
    torch.set_float32_matmul_precision("high" if hp["tf32"] else "highest")
  torch.manual_seed(hp["seed"])
  if torch.cuda.is_available():
    torch.cuda.manual_seed_all(hp["seed"])


def build(off: types.SimpleNamespace, hp: dict, depth: int, patch_nums: tuple[int, ...], device: str, attn: str):
  """Model, AMP optimiser and trainer as train.py build_everything makes them (no data, no DDP).

  Returns:
    (trainer, nsp_wo_ddp, vae_local).
  """
  vae_local, nsp_wo_ddp = off.build_vae_nsp(
    V=VOCAB,
    Cvae=CVAE,
    ch=160,
    share_quant_resi=4,
    device=device,
    patch_nums=patch_nums,
    num_classes=NUM_CLASSES,
    depth=depth,
    shared_aln=hp["saln"],
    attn_l2_norm=hp["anorm"],
    flash_if_available=hp["fuse"],
    fused_if_available=hp["fuse"],
    init_adaln=hp["aln"],
    init_adaln_gamma=hp["alng"],
    init_head=hp["hd"],
    init_std=hp["ini"],
  )
  if attn == "sdpa":  # the official non-kernel path: SDPA with the block-diagonal attn_bias
    nsp_wo_ddp.using_block_sparse_attn = False
  nsp = off.dist.NullDDP(nsp_wo_ddp)
  with quiet_official_print():  # train.py's no-weight-decay keys
    names, paras, para_groups = off.filter_params(
      nsp_wo_ddp,
      nowd_keys={
        "cls_token",
        "start_token",
        "task_token",
        "cfg_uncond",
        "pos_embed",
        "pos_1LC",
        "pos_start",
        "start_pos",
        "lvl_embed",
        "gamma",
        "beta",
        "ada_gss",
        "moe_bias",
        "scale_mul",
      },
    )
  assert hp["opt"] in ("adam", "adamw")
  opt = torch.optim.AdamW(params=para_groups, lr=hp["tlr"], weight_decay=0, betas=(0.9, 0.95), fused=hp["afuse"])
  mixed = hp["fp16"] if device == "cuda" else 0  # the official AMP context is CUDA-only
  optimizer = off.AmpOptimizer(
    mixed_precision=mixed,
    optimizer=opt,
    names=names,
    paras=paras,
    grad_clip=hp["tclip"],
    n_gradient_accumulation=hp["ac"],
  )
  trainer = off.Trainer(
    device=device,
    patch_nums=patch_nums,
    resos=tuple(p * PATCH_SIZE for p in patch_nums),
    vae_local=vae_local,
    transformer_wo_ddp=nsp_wo_ddp,
    transformer=nsp,
    optimizer=optimizer,
    label_smooth=hp["ls"],
    reweight_loss=hp["reweight_loss"],
    loss_reweight_type=hp["loss_reweight_type"],
  )
  # train.py train_one_ep sets lr and wd every iteration; here once, at the end of warm-up.
  iters = math.ceil(IMAGENET_TRAIN_IMAGES / hp["bs"])
  wp_it = hp["wp"] * iters
  off.lr_wd_annealing(
    hp["sche"],
    opt,
    hp["tlr"],
    hp["twd"],
    hp["twde"],
    round(wp_it),
    wp_it,
    hp["ep"] * iters,
    wp0=hp["wp0"],
    wpe=hp["wpe"],
  )
  return trainer, nsp_wo_ddp, vae_local


def train_step(trainer, label_b: torch.Tensor, gt_bl: torch.Tensor, x_blcv: torch.Tensor):
  """Body of NextScaleTrainer.train_step (nsp_trainer.py) with stepping=True, minus logging.

  Args:
    trainer: official trainer.Trainer (its transformer, optimizer, train_loss, loss_weight).
    label_b: (B,) int64 class labels.
    gt_bl: (B, L) int64 target token indices (the official step gets them from the VQVAE).
    x_blcv: (B, L - 1, Cvae) float32 teacher-forcing input (idxBl_to_ns_input in the official).

  Returns:
    (loss () tensor, grad_norm () tensor before clipping, log2 of the fp16 loss scale or None).
  """
  b, v = label_b.shape[0], trainer.vae_local.vocab_size
  trainer.transformer.require_backward_grad_sync = True
  with trainer.optimizer.amp_ctx:
    logits_blv = trainer.transformer(label_b, x_blcv)
    loss = trainer.train_loss(logits_blv.view(-1, v), gt_bl.view(-1)).view(b, -1)
    loss = loss.mul(trainer.loss_weight).sum(dim=-1).mean()
  grad_norm, scale_log2 = trainer.optimizer.backward_clip_step(loss=loss, stepping=True)
  logits_blv.data.argmax(dim=-1)  # pred_BL, taken every step by the official train_step
  return loss.detach(), grad_norm, scale_log2


def sync(device: str) -> None:
  if device == "cuda":
    torch.cuda.synchronize()


def run_setting(off, args, depth: int, res: int, batch: int) -> dict:
  """Builds, warms up and times one setting; returns its result row (raises on failure)."""
  device = args.device
  patch_nums = PATCH_NUMS[res]
  seq = sum(p * p for p in patch_nums)
  hp = experiment_hparams(args.ref_dir, depth)
  set_torch_flags(hp)
  smoke = device != "cuda"
  attn = "sdpa" if smoke else args.attn
  sync(device)
  t0 = time.perf_counter()
  trainer, nsp, vae = build(off, hp, depth, patch_nums, device, attn)
  sync(device)
  build_s = time.perf_counter() - t0

  g = torch.Generator(device="cpu").manual_seed(hp["seed"])
  label_b = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
  gt_bl = torch.randint(0, VOCAB, (batch, seq), generator=g).to(device)
  x_blcv = torch.randn((batch, seq - 1, CVAE), generator=g).to(device)

  sync(device)
  t0 = time.perf_counter()
  loss, grad_norm, scale_log2 = train_step(trainer, label_b, gt_bl, x_blcv)
  sync(device)
  first_step_s = time.perf_counter() - t0
  scales = [scale_log2]
  for _ in range(args.warmup - 1):
    _, _, scale_log2 = train_step(trainer, label_b, gt_bl, x_blcv)
    scales.append(scale_log2)
  times = []
  losses, norms = [], []
  for _ in range(args.steps):
    sync(device)
    t0 = time.perf_counter()
    loss, grad_norm, scale_log2 = train_step(trainer, label_b, gt_bl, x_blcv)
    sync(device)
    times.append(time.perf_counter() - t0)
    losses.append(loss)
    norms.append(grad_norm)
    scales.append(scale_log2)
  losses = [float(x) for x in losses]
  norms = [float(x) if x is not None else None for x in norms]
  # GradScaler skips the optimiser step (and halves the scale) when gradients overflow.
  skipped = sum(1 for a, b in zip(scales, scales[1:]) if a is not None and b is not None and b < a)

  ms = 1e3 * statistics.median(times)
  fl = flop_model(depth, patch_nums, batch)
  from_model = counts_from_model(nsp)
  assert all(fl[k] == from_model[k] for k in from_model), (fl, from_model)
  mfu = None if smoke else fl["total_flops"] / (ms / 1e3) / args.peak_flops
  row = dict(
    variant=f"d{depth}",
    kind="hmar",
    res=res,
    batch=batch,
    depth=depth,
    attn=(
      "official SDPA path with the block-diagonal attn_bias (CPU smoke test only, not the kernel)"
      if smoke
      else "official triton block_sparse_attn (fp16)"
      if attn == "kernel"
      else "official SDPA path with the block-diagonal attn_bias"
    ),
    dtype=(
      "float32, no AMP (CPU smoke test)"
      if smoke
      else "fp16 autocast + GradScaler, fused AdamW"
      if hp["fp16"] == 1
      else f"mixed_precision={hp['fp16']}, fused AdamW"
    ),
    params=sum(p.numel() for p in nsp.parameters()),
    vae_params_resident=sum(p.numel() for p in vae.parameters()),
    build_s=round(build_s, 2),
    first_step_s=round(first_step_s, 2),
    step_ms_median=round(ms, 3),
    step_ms_min=round(1e3 * min(times), 3),
    step_ms_max=round(1e3 * max(times), 3),
    steps=args.steps,
    warmup=args.warmup,
    img_s=round(1e3 * batch / ms, 2),
    peak_gib=(round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None),
    mfu=None if mfu is None else round(mfu, 4),
    peak_flops=args.peak_flops,
    loss_first_last=[round(losses[0], 4), round(losses[-1], 4)],
    grad_norm_last=None if norms[-1] is None else round(norms[-1], 4),
    fp16_scale_log2_last=scales[-1],
    fp16_skipped_steps=skipped,
    all_finite=all(math.isfinite(x) for x in losses),
    hparams={
      k: hp[k]
      for k in (
        "yaml",
        "fp16",
        "alng",
        "aln",
        "hd",
        "tblr",
        "tlr",
        "twd",
        "tclip",
        "ls",
        "reweight_loss",
        "loss_reweight_type",
        "afuse",
        "saln",
        "anorm",
        "fuse",
      )
    },
    lr=trainer.optimizer.optimizer.param_groups[0]["lr"],
    weight_decays=sorted({g["weight_decay"] for g in trainer.optimizer.optimizer.param_groups}),
    device=(
      torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    ),
    torch=torch.__version__,
    triton=_triton_version(),
    flops=fl,
  )
  if smoke:
    row["smoke_test"] = True
  return row


def _triton_version() -> str | None:
  try:
    import triton  # pylint: disable=import-outside-toplevel

    return triton.__version__
  except ImportError:
    return None


def free_memory(device: str) -> None:
  gc.collect()
  if device == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def check_flops(off=None, build_models: bool = False) -> bool:
  """Compares flop_model (and, with build_models, the built official models) with the anchors."""
  ok = True
  for (depth, res, batch), want in ANCHOR_FLOPS.items():
    got = flop_model(depth, PATCH_NUMS[res], batch)
    bad = {k: (got[k], want[k]) for k in got if got[k] != want[k]}
    mfu = got["total_flops"] / (ANCHOR_MS[(depth, res, batch)] / 1e3) / DEFAULT_PEAK_FLOPS
    mfu_ok = round(mfu, 4) == ANCHOR_MFU[(depth, res, batch)]
    line = (
      f"d{depth}:{res}:{batch} flops {'match' if not bad else f'DIFFER {bad}'}; "
      f"mfu from the anchor's ms {mfu:.4f} vs {ANCHOR_MFU[(depth, res, batch)]}"
    )
    ok &= not bad and mfu_ok
    if build_models:
      _, nsp = off.build_vae_nsp(
        V=VOCAB,
        Cvae=CVAE,
        ch=160,
        share_quant_resi=4,
        device="cpu",
        patch_nums=PATCH_NUMS[res],
        num_classes=NUM_CLASSES,
        depth=depth,
        init_std=-1,
      )
      n = sum(p.numel() for p in nsp.parameters())
      cm = counts_from_model(nsp)
      same = n == want["params"] and all(cm[k] == want[k] for k in cm)
      line += f"; built model params {n} vs {want['params']}, module counts {'match' if same else f'DIFFER {cm}'}"
      ok &= same
      del nsp
      gc.collect()
    print(line, flush=True)
  print("FLOP model check:", "PASS" if ok else "FAIL", flush=True)
  return ok


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ref_dir", required=True, help="copy of the needed NVlabs/HMAR sources")
  p.add_argument("--out", help="JSON output file")
  p.add_argument(
    "--settings", default="d16:256:64,d24:256:32,d16:512:16", help="comma-separated depth:resolution:batch"
  )
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
  p.add_argument(
    "--attn",
    choices=("kernel", "sdpa"),
    default="kernel",
    help="official block-sparse Triton kernel, or the official SDPA + mask path",
  )
  p.add_argument("--peak_flops", type=float, default=DEFAULT_PEAK_FLOPS)
  p.add_argument(
    "--tiny", action="store_true", help="debug: d2:256:2, 2 steps after 1 warm-up (on the CPU without a GPU)"
  )
  p.add_argument(
    "--check_flops", action="store_true", help="check the FLOP model against the official anchor figures and exit"
  )
  p.add_argument(
    "--build_models", action="store_true", help="with --check_flops: also build the three official models on the CPU"
  )
  args = p.parse_args()
  if args.device == "auto":
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
  if args.check_flops:
    off = import_official(args.ref_dir, "cpu") if args.build_models else None
    sys.exit(0 if check_flops(off, args.build_models) else 1)
  if not args.out:
    p.error("--out is required")
  if args.tiny:
    args.settings, args.steps, args.warmup = "d2:256:2", 2, 1
  settings = parse_settings(args.settings)
  if args.steps < 1 or args.warmup < 1:
    p.error("--steps and --warmup must be at least 1 (the first warm-up step is timed alone)")
  off = import_official(args.ref_dir, args.device)

  rows = []
  for depth, res, batch in settings:
    free_memory(args.device)
    try:
      row = run_setting(off, args, depth, res, batch)
    except Exception as e:  # pylint: disable=broad-except  # OOM or failure: record, go on
      traceback.print_exc()
      row = dict(
        variant=f"d{depth}", kind="hmar", res=res, batch=batch, depth=depth, error=f"{type(e).__name__}: {e}"[-1500:]
      )
    free_memory(args.device)
    print(json.dumps({k: v for k, v in row.items() if k not in ("flops", "hparams")}), flush=True)
    rows.append(row)
    write_json(args, rows)  # after every setting, so a run stopped early keeps what it measured

  print(f"\n{'setting':<14}{'ms/step':>10}{'img/s':>9}{'peak GiB':>10}{'MFU':>8}{'build s':>9}{'1st step s':>12}")
  for r in rows:
    name = f"{r['variant']}:{r['res']}:{r['batch']}"
    if "error" in r:
      print(f"{name:<14}  ERROR {r['error'][:100]}")
      continue
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.4f}"
    print(
      f"{name:<14}{r['step_ms_median']:>10.1f}{r['img_s']:>9.2f}{peak:>10}{mfu:>8}"
      f"{r['build_s']:>9.2f}{r['first_step_s']:>12.2f}"
    )
  print(f"wrote {args.out}")


def write_json(args, rows: list[dict]) -> None:
  """Writes the result file: run-level fields and one row per setting (so far)."""
  out = dict(
    what=(
      "official NVlabs/HMAR next-scale train step: body of NextScaleTrainer.train_step "
      "(fp16 autocast, GradScaler, fused AdamW, clip 2.0, lognorm weights), random "
      "tokens/teacher inputs/labels, median of synchronised steps after warm-up; MFU "
      "counts adaLN once per image (see each row's flops)"
    ),
    peak_flops=args.peak_flops,
    device_kind=args.device,
    flash_attn_available=_module_exists("flash_attn"),
    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    train=rows,
  )
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


def _module_exists(name: str) -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel

  return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
  main()
