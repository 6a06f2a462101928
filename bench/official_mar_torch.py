"""Times the official PyTorch MAR (LTH14/mar) and Hi-MAR (HiDream-ai/himar) code on one GPU.

For comparison with our JAX figures. Run in its own process (PyTorch and JAX would both claim the
GPU). The official sources are read from --mar_dir and --himar_dir, plain copies of the needed
files of each repository with its layout (git-ignored .whl/official_mar and .whl/official_himar,
each with a SOURCE.txt naming the commit); they are not part of this repository. Both repositories have top-level packages named `models`, `diffusion` and `util`: each
family is imported with its own folder first on sys.path, its module objects are kept, and every
`models*` / `diffusion*` / `util*` / `engine_mar` entry is then purged from sys.modules (and the
folder from sys.path) before the other family is imported; the script checks that every module it
loaded came from the family's own folder.

  python bench/official_mar_torch.py --mar_dir .whl/official_mar --himar_dir .whl/official_himar \\
      --settings mar_sample:base:64:64,mar_sample:base:64:256,mar_train:base:64,himar_sample:base:64 \\
      --out official_mar.json

Settings are kind:variant:batch[:steps], comma-separated. Variants: base, large, huge (the official
builders `mar_base` ... / `himar_base` ... with the official READMEs' evaluation flags) and tiny
(small widths and depths by constructor arguments, for a CPU check). Per kind:

  * mar_sample: `engine_mar.evaluate`'s timed region for one batch: under `torch.no_grad()` and
    `torch.cuda.amp.autocast()` (fp16), `MAR.sample_tokens(bsz=batch, num_iter=steps, cfg=cfg,
    cfg_schedule='linear', labels=labels, temperature=1.0)` then `vae.decode(tokens / 0.2325)`.
    README flags: MAR-B cfg 2.9 (L 3.0, H 3.2), temperature 1.0, num_sampling_steps '100' (the
    diffusion head's respaced steps), diffloss depth/width 6/1024 (L 8/1280, H 12/1536); steps
    (num_iter) default 64. Labels as evaluate makes them (class c repeated 50 times, first batch).
  * mar_train / mar_train_vae: the body of `engine_mar.train_one_epoch` for one step, re-stated in
    `mar_train_step` (the function iterates a data loader and logs; it is not callable for one
    step): `util.lr_sched.adjust_learning_rate`, then under no_grad the latent:
    mar_train: cached path (`args.use_cached`): random moments (B, 32, 16, 16) ->
    `DiagonalGaussianDistribution(moments).sample().mul_(0.2325)`; mar_train_vae: random images
    (B, 3, 256, 256) -> `vae.encode(images).sample().mul_(0.2325)` (float32: the official encode
    runs outside autocast). Then `model(x, labels)` under `torch.cuda.amp.autocast()`, `loss.item()`
    with the official finiteness check, `util.misc.NativeScalerWithGradNormCount` (GradScaler,
    unscale, clip_grad_norm_ 3.0 over model.parameters(), step, update), `optimizer.zero_grad()`,
    `torch.cuda.synchronize()`, `engine_mar.update_ema(ema_params, model_params, rate=0.9999)`.
    Optimiser as main_mar.py builds it: `torch.optim.AdamW(misc.add_weight_decay(model, 0.02),
    lr=1e-4 * batch / 256, betas=(0.9, 0.95))`; the learning rate is set at the end of warm-up.
    diffusion_batch_mul 4 (README), label drop 0.1, dropouts 0.1, mask_ratio_min 0.7, buffer 64,
    the variant's evaluation diffusion head (MAR-B 6/1024; the README's MAR-L training command
    shows 3/1024). One GPU, no DistributedDataParallel.
  * himar_sample: `engine_mar.evaluate` of Hi-MAR for one batch: under no_grad and autocast,
    `HiMAR.sample_tokens(bsz=batch, num_iter=steps, cfg=cfg, re_cfg=re_cfg, cfg_schedule='linear',
    labels=labels, temperature=1.0, vq_model=None)`, then `vae.decode(small / 0.2325)`,
    `F.interpolate(..., size=(64, 64), mode='bicubic')` and `vae.decode(big / 0.2325)`. README
    flags for Hi-MAR-B: cfg 2.5, re_cfg 2.7, num_iter 4 (stage 2), cond_scale 8 (stage 1 runs
    cond_scale * 4 = 32 steps, fixed by the model), cond_dim 16, diffloss 6/1024, global DiT head
    gdm 6/512, head 8, ratio 4, cos, seq_len 256, num_sampling_steps '100' for the MLP head; the
    global DiT head's sampler is hard-coded to 250 respaced steps (models/diffloss.py).
    Hi-MAR's training path is broken upstream (DiffLoss.forward reads `t` before assigning it), so
    there is no himar_train kind; the JSON says so.

Weights: the official initialisation (random; `--init normal` draws every floating parameter and
buffer of the generator from N(0, 0.02) instead). The KL-16 VAE is `models.vae.AutoencoderKL(
embed_dim=16, ch_mult=(1, 1, 2, 2, 4), ckpt_path=None)`, random, in eval mode. Seeds as main_mar.py
(torch.manual_seed(1), np.random.seed(1)) per setting. cudnn.benchmark = True as main_*.py set it;
TF32 flags left at PyTorch's defaults (the official scripts do not touch them).

Timing: the first call (or train step) alone (first_s), then the median of --repeats sampling calls
(or --train_steps train steps after --train_warmup untimed ones), each between two
`torch.cuda.synchronize()`; peak memory from `torch.cuda.max_memory_allocated()`, reset per
setting. A setting that fails (out of memory, ...) is recorded with its error and the run goes on;
the JSON is rewritten after every setting.

Without a GPU (`--device cpu`; `--tiny`: every kind at variant tiny, MAR batch 2, Hi-MAR batch 1,
one timed repeat or step):
the official code's `Tensor.cuda()` calls are made no-ops, autocast and GradScaler disable
themselves (CUDA-only), and the rows say `"smoke_test": true`; their times mean nothing.

  python bench/official_mar_torch.py --mar_dir .whl/official_mar --himar_dir .whl/official_himar \\
      --tiny --out /tmp/official_mar_tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import types
import warnings

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official_train_step_torch import free_memory, quiet_official_print  # noqa: E402

KINDS = ("mar_sample", "mar_train", "mar_train_vae", "himar_sample")
LATENT_SCALE = 0.2325  # engine_mar: "normalize the std of latent to be 1"
VAE_KW = dict(embed_dim=16, ch_mult=(1, 1, 2, 2, 4), ckpt_path=None)
NUM_CLASSES = 1000
IMAGES_PER_CLASS = 50  # evaluate's labels: arange(1000).repeat(num_images // 1000), num_images 50000
SEED = 1  # main_mar.py / main_himar.py --seed default (plus rank 0)
HIMAR_TRAIN_NOTE = (
  "no himar_train timing: the official Hi-MAR training path is broken (models/diffloss.py "
  "DiffLoss.forward tests `if t is None` before `t` is assigned, an UnboundLocalError on the first step)"
)
# Hi-MAR's tiny batch is 1: its VAE decode stays at 256 px (the global head's 16 x 16 input is fixed).
TINY_SETTINGS = "mar_sample:tiny:2:16,mar_train:tiny:2,mar_train_vae:tiny:2,himar_sample:tiny:1:1"

# main_mar.py argument defaults and README flags shared by every MAR variant.
MAR_COMMON = dict(
  img_size=256,
  vae_stride=16,
  patch_size=1,
  vae_embed_dim=16,
  mask_ratio_min=0.7,
  label_drop_prob=0.1,
  class_num=NUM_CLASSES,
  attn_dropout=0.1,
  proj_dropout=0.1,
  buffer_size=64,
  num_sampling_steps="100",
  diffusion_batch_mul=4,  # README training command (main_mar.py's default is 1)
  grad_checkpointing=False,
)
# README evaluation commands: builder, diffusion head, guidance. 'tiny' builds MAR(...) directly.
MAR_VARIANTS = {
  "base": dict(builder="mar_base", model=dict(diffloss_d=6, diffloss_w=1024), cfg=2.9),
  "large": dict(builder="mar_large", model=dict(diffloss_d=8, diffloss_w=1280), cfg=3.0),
  "huge": dict(builder="mar_huge", model=dict(diffloss_d=12, diffloss_w=1536), cfg=3.2),
  "tiny": dict(
    builder=None,
    model=dict(
      img_size=64,
      encoder_embed_dim=64,
      encoder_depth=2,
      encoder_num_heads=4,
      decoder_embed_dim=64,
      decoder_depth=2,
      decoder_num_heads=4,
      mlp_ratio=4,
      diffloss_d=2,
      diffloss_w=64,
      num_sampling_steps="5",
    ),
    cfg=2.9,
  ),
}
# main_mar.py training defaults (one GPU: eff_batch_size = batch).
MAR_TRAIN = dict(blr=1e-4, weight_decay=0.02, betas=(0.9, 0.95), grad_clip=3.0, ema_rate=0.9999, warmup_epochs=100)

# main_himar.py argument defaults and README flags shared by every Hi-MAR variant.
HIMAR_COMMON = dict(
  img_size=256,
  vae_stride=16,
  patch_size=1,
  vae_embed_dim=16,
  mask_ratio_min=0.7,
  label_drop_prob=0.1,
  class_num=NUM_CLASSES,
  attn_dropout=0.1,
  proj_dropout=0.1,
  buffer_size=64,
  num_sampling_steps="100",
  diffusion_batch_mul=1,
  grad_checkpointing=False,
  cond_drop_prob=0.5,
  diff_seqlen=False,
  step_warmup=100,
  step_stage2_rate=0.25,
  cond_scale=8,
  cond_dim=16,
  two_diffloss=True,
  seq_len=256,
  global_dm=True,
  cos=True,
)
HIMAR_VARIANTS = {
  "base": dict(
    builder="himar_base",
    model=dict(diffloss_d=6, diffloss_w=1024, gdm_d=6, gdm_w=512, head=8, ratio=4),
    cfg=2.5,
    re_cfg=2.7,
    num_iter=4,
  ),
  "large": dict(
    builder="himar_large",
    model=dict(diffloss_d=8, diffloss_w=1280, gdm_d=8, gdm_w=512, head=8, ratio=4),
    cfg=3.5,
    re_cfg=3.5,
    num_iter=4,
  ),
  "huge": dict(
    builder="himar_huge",
    model=dict(diffloss_d=12, diffloss_w=1536, gdm_d=12, gdm_w=768, head=12, ratio=4),
    cfg=3.2,
    re_cfg=5.5,
    num_iter=12,
  ),
  # img_size stays 256: the global DiT head's input size (16 x 16 tokens) is hard-coded.
  "tiny": dict(
    builder=None,
    model=dict(
      encoder_embed_dim=64,
      encoder_depth=1,
      encoder_num_heads=4,
      decoder_embed_dim=64,
      decoder_depth=1,
      decoder_num_heads=4,
      mlp_ratio=4,
      diffloss_d=1,
      diffloss_w=64,
      num_sampling_steps="4",
      # stage 1 runs cond_scale * 4 steps over cond_scale^2 tokens; below 4 some steps would
      # predict no token and the official sampler fails on the empty batch.
      cond_scale=4,
      gdm_d=1,
      gdm_w=32,
      head=2,
      ratio=4,
    ),
    cfg=2.5,
    re_cfg=2.7,
    num_iter=1,
  ),
}

# Top-level names both repositories define; purged between the two imports.
FAMILY_TOP_LEVEL = ("models", "diffusion", "util", "engine_mar")


def tokens_per_image(kind: str, variant: str) -> int:
  """Tokens the sampler's mask schedule spreads over its steps (Hi-MAR: stage 2, seq_len)."""
  if kind.startswith("himar"):
    return HIMAR_COMMON["seq_len"]
  img_size = {**MAR_COMMON, **MAR_VARIANTS[variant]["model"]}["img_size"]
  return (img_size // MAR_COMMON["vae_stride"] // MAR_COMMON["patch_size"]) ** 2


def parse_settings(text: str) -> list[dict]:
  """'mar_sample:base:64:256,mar_train:base:64' -> [{kind, variant, batch, steps}, ...].

  steps: num_iter for mar_sample (default 64, at most the tokens per image), the stage-2 num_iter for himar_sample (default the
  variant's README value); train kinds take none. Raises ValueError naming the bad item.
  """
  out = []
  for item in text.split(","):
    item = item.strip()
    parts = item.split(":")
    if len(parts) not in (3, 4):
      raise ValueError(f"bad setting {item!r}: expected kind:variant:batch[:steps]")
    kind, variant, batch = parts[0], parts[1], parts[2]
    if kind not in KINDS:
      raise ValueError(f"bad setting {item!r}: kind must be one of {', '.join(KINDS)}")
    variants = HIMAR_VARIANTS if kind.startswith("himar") else MAR_VARIANTS
    if variant not in variants:
      raise ValueError(f"bad setting {item!r}: variant must be one of {', '.join(variants)}")
    if not batch.isdigit() or int(batch) < 1:
      raise ValueError(f"bad setting {item!r}: batch must be a positive integer")
    steps = None
    if len(parts) == 4:
      if kind.startswith("mar_train"):
        raise ValueError(f"bad setting {item!r}: {kind} takes no steps (kind:variant:batch)")
      if not parts[3].isdigit() or int(parts[3]) < 1:
        raise ValueError(f"bad setting {item!r}: steps must be a positive integer")
      steps = int(parts[3])
    if steps is not None and steps > tokens_per_image(kind, variant):
      # the official mask schedule would leave steps with no token to predict: an empty batch fails
      raise ValueError(
        f"bad setting {item!r}: steps must be at most {tokens_per_image(kind, variant)} (tokens per image)"
      )
    if kind == "mar_sample" and steps is None:
      # main_mar.py --num_iter default (the README's FID runs use 256)
      steps = min(64, tokens_per_image(kind, variant))
    elif kind == "himar_sample" and steps is None:
      steps = variants[variant]["num_iter"]
    out.append(dict(kind=kind, variant=variant, batch=int(batch), steps=steps))
  return out


def _purge_family_modules() -> None:
  for name in list(sys.modules):
    if name.split(".")[0] in FAMILY_TOP_LEVEL:
      del sys.modules[name]


def import_family(src_dir: str, module_names: tuple[str, ...], stand_ins: tuple[str, ...] = ()) -> dict:
  """Imports the named official modules from src_dir alone and returns them by name.

  Args:
    src_dir: a copy of one official repository (its layout).
    module_names: dotted names to import, e.g. ('models.mar', 'engine_mar').
    stand_ins: modules the official files import at top level but the timed code never uses
      (e.g. torch_fidelity, cv2 in engine_mar.py); empty stand-ins are registered for those not
      installed, for the import only.

  Returns:
    {name: module}; the modules stay usable after the purge (their globals hold what they imported).
  """
  src_dir = os.path.abspath(src_dir)
  _purge_family_modules()
  sys.path.insert(0, src_dir)
  added = [n for n in stand_ins if n not in sys.modules and importlib.util.find_spec(n) is None]
  for n in added:
    sys.modules[n] = types.ModuleType(n)
  try:
    with quiet_official_print():  # Hi-MAR prints its attention mode at import
      mods = {n: importlib.import_module(n) for n in module_names}
    foreign = [
      f"{name} ({getattr(m, '__file__', None)})"
      for name, m in sys.modules.items()
      if name.split(".")[0] in FAMILY_TOP_LEVEL
      and getattr(m, "__file__", None)
      and not os.path.abspath(m.__file__).startswith(src_dir + os.sep)
    ]
    if foreign:
      raise ImportError(f"modules not from {src_dir}: {', '.join(foreign)}")
  finally:
    sys.path.remove(src_dir)
    for n in added:
      sys.modules.pop(n, None)
    _purge_family_modules()
  return mods


def check_source_dir(path: str | None, flag: str, needed: tuple[str, ...]) -> None:
  """Raises FileNotFoundError naming the flag and the first missing official file."""
  if not path:
    raise FileNotFoundError(f"{flag} is required for the settings given")
  for rel in needed:
    if not os.path.isfile(os.path.join(path, rel)):
      raise FileNotFoundError(f"{flag} {path}: no {rel} (a copy of the official repository is expected)")


def source_commit(path: str) -> str | None:
  """The commit named in the folder's SOURCE.txt ('commit: <sha>'), if any."""
  try:
    with open(os.path.join(path, "SOURCE.txt")) as f:
      for line in f:
        if line.startswith("commit:"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def load_mar(mar_dir: str) -> types.SimpleNamespace:
  mods = import_family(
    mar_dir,
    ("models.mar", "models.vae", "util.misc", "util.lr_sched", "engine_mar"),
    stand_ins=("torch_fidelity", "cv2"),
  )
  return types.SimpleNamespace(
    mar=mods["models.mar"],
    vae=mods["models.vae"],
    misc=mods["util.misc"],
    lr_sched=mods["util.lr_sched"],
    engine=mods["engine_mar"],
    commit=source_commit(mar_dir),
  )


def load_himar(himar_dir: str) -> types.SimpleNamespace:
  # models/diffloss.py and models/models.py import einops at top level; the folder carries its
  # pure-Python wheel for machines without it (a wheel on sys.path imports as a zip).
  if importlib.util.find_spec("einops") is None:
    wheels = sorted(f for f in os.listdir(himar_dir) if f.startswith("einops-") and f.endswith(".whl"))
    if not wheels:
      raise ImportError(f"einops is not installed and {himar_dir} carries no einops wheel")
    sys.path.append(os.path.abspath(os.path.join(himar_dir, wheels[-1])))
  mods = import_family(himar_dir, ("models.himar", "models.vae", "models.models", "models.diffloss"))
  return types.SimpleNamespace(
    himar=mods["models.himar"],
    vae=mods["models.vae"],
    dit=mods["models.models"],
    commit=source_commit(himar_dir),
  )


@contextlib.contextmanager
def cuda_calls_on_cpu(device: str):
  """On the CPU, makes the official code's hard-coded `Tensor.cuda()` calls return the tensor."""
  if device == "cuda":
    yield
    return
  orig = torch.Tensor.cuda
  torch.Tensor.cuda = lambda self, *a, **k: self
  try:
    yield
  finally:
    torch.Tensor.cuda = orig


def sync(device: str) -> None:
  if device == "cuda":
    torch.cuda.synchronize()


def seed_all() -> None:
  torch.manual_seed(SEED)
  np.random.seed(SEED)


def normal_init_(module: torch.nn.Module, seed: int = 0) -> None:
  """Every floating parameter and buffer of module from N(0, 0.02) (the --init normal option)."""
  g = torch.Generator(device="cpu").manual_seed(seed)
  with torch.no_grad():
    for t in list(module.parameters()) + list(module.buffers()):
      if t.is_floating_point():
        t.copy_(torch.randn(t.shape, generator=g) * 0.02)


def build_vae(vae_mod, device: str) -> torch.nn.Module:
  """As main_mar.py / main_himar.py: AutoencoderKL(...).cuda().eval(), parameters frozen."""
  with quiet_official_print():  # the decoder prints its latent shape
    vae = vae_mod.AutoencoderKL(**VAE_KW).to(device).eval()
  for p in vae.parameters():
    p.requires_grad = False
  return vae


def build_mar(fam, variant: str, device: str, init: str) -> torch.nn.Module:
  v = MAR_VARIANTS[variant]
  kw = {**MAR_COMMON, **v["model"]}
  if v["builder"] is None:
    kw["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=1e-6)  # as the builders pass it
    model = fam.mar.MAR(**kw)
  else:
    model = getattr(fam.mar, v["builder"])(**kw)
  if init == "normal":
    normal_init_(model)
  return model.to(device)


def build_himar(fam, variant: str, device: str, init: str) -> torch.nn.Module:
  v = HIMAR_VARIANTS[variant]
  kw = {**HIMAR_COMMON, **v["model"]}
  if v["builder"] is None:
    kw["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=1e-6)
    model = fam.himar.HiMAR(**kw)
  else:
    model = getattr(fam.himar, v["builder"])(**kw)
  if init == "normal":
    normal_init_(model)
  return model.to(device)


def n_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
  return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def eval_labels(batch: int, device: str) -> torch.Tensor:
  """(batch,) int64: the first batch of evaluate's label list (each class IMAGES_PER_CLASS times)."""
  labels = np.arange(0, NUM_CLASSES).repeat(IMAGES_PER_CLASS)[:batch]
  if batch > labels.size:
    labels = np.resize(labels, batch)
  return torch.from_numpy(labels).long().to(device)


def autocast():
  """The official autocast context (fp16 on CUDA; on a machine without CUDA it disables itself)."""
  return torch.cuda.amp.autocast()


def time_calls(fn, n: int, device: str) -> tuple[float, list[float], object]:
  """Runs fn once (timed alone), then n more times; returns (first_s, [s, ...], last output)."""
  sync(device)
  t0 = time.perf_counter()
  out = fn()
  sync(device)
  first = time.perf_counter() - t0
  times = []
  for _ in range(n):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    times.append(time.perf_counter() - t0)
  return first, times, out


def timing_fields(first: float, times: list[float], batch: int) -> dict:
  med = statistics.median(times)
  return dict(
    first_s=round(first, 4),
    median_s=round(med, 4),
    min_s=round(min(times), 4),
    max_s=round(max(times), 4),
    times_s=[round(t, 4) for t in times],
    img_s=round(batch / med, 3),
  )


def run_mar_sample(fam, s: dict, args) -> dict:
  device, v = args.device, MAR_VARIANTS[s["variant"]]
  seed_all()
  sync(device)
  t0 = time.perf_counter()
  model = build_mar(fam, s["variant"], device, args.init)
  vae = build_vae(fam.vae, device)
  model.eval()  # evaluate: model_without_ddp.eval()
  sync(device)
  build_s = time.perf_counter() - t0
  labels = eval_labels(s["batch"], device)
  call_kw = dict(bsz=s["batch"], num_iter=s["steps"], cfg=v["cfg"], cfg_schedule="linear", temperature=1.0)

  def call():
    with torch.no_grad(), autocast():
      sampled_tokens = model.sample_tokens(labels=labels, **call_kw)
      return vae.decode(sampled_tokens / LATENT_SCALE)

  first, times, images = time_calls(call, args.repeats, device)
  row = dict(
    build_s=round(build_s, 2),
    **timing_fields(first, times, s["batch"]),
    params=n_params(model),
    params_trainable=n_params(model, trainable_only=True),
    params_diffloss=n_params(model.diffloss),
    params_vae=n_params(vae),
    output_shape=list(images.shape),
    output_finite=bool(torch.isfinite(images).all()),
    official_call=(
      f"MAR.sample_tokens(bsz={s['batch']}, num_iter={s['steps']}, cfg={v['cfg']}, cfg_schedule='linear', "
      "labels=labels, temperature=1.0); vae.decode(tokens / 0.2325); under torch.no_grad() and "
      "torch.cuda.amp.autocast()"
    ),
    exact=dict(
      builder=v["builder"] or "MAR(...)",
      model_kwargs={k: (list(x) if isinstance(x, tuple) else x) for k, x in {**MAR_COMMON, **v["model"]}.items()},
      cfg=v["cfg"],
      cfg_schedule="linear",
      temperature=1.0,
      num_iter=s["steps"],
      diffusion_steps=int({**MAR_COMMON, **v["model"]}["num_sampling_steps"]),
      guided_rows=2 * s["batch"],
      decode_included=True,
      labels="np.arange(1000).repeat(50)[:batch]",
    ),
  )
  return row


def mar_train_step(fam, model, vae, optimizer, loss_scaler, model_params, ema_params, batch_in, labels, hp, device):
  """One iteration of the body of official engine_mar.train_one_epoch.

  Args:
    batch_in: (B, 32, 16, 16) cached moments when hp.use_cached, else (B, 3, H, W) images in [-1, 1].
    labels: (B,) int64.
    hp: namespace with the official args the body reads (lr schedule fields, grad_clip, ema_rate,
      use_cached) and `epoch`, the fractional epoch passed to the lr schedule.

  Returns:
    (loss () float, grad norm () tensor before clipping).
  """
  fam.lr_sched.adjust_learning_rate(optimizer, hp.epoch, hp)
  with torch.no_grad():
    posterior = fam.vae.DiagonalGaussianDistribution(batch_in) if hp.use_cached else vae.encode(batch_in)
    x = posterior.sample().mul_(LATENT_SCALE)
  with autocast():
    loss = model(x, labels)
  loss_value = loss.item()
  if not math.isfinite(loss_value):  # the official loop prints and exits here
    raise FloatingPointError(f"Loss is {loss_value}, stopping training")
  grad_norm = loss_scaler(loss, optimizer, clip_grad=hp.grad_clip, parameters=model.parameters(), update_grad=True)
  optimizer.zero_grad()
  sync(device)
  fam.engine.update_ema(ema_params, model_params, rate=hp.ema_rate)
  return loss_value, grad_norm


def run_mar_train(fam, s: dict, args) -> dict:
  device, variant, batch = args.device, s["variant"], s["batch"]
  use_cached = s["kind"] == "mar_train"
  seed_all()
  sync(device)
  t0 = time.perf_counter()
  vae = build_vae(fam.vae, device)
  model = build_mar(fam, variant, device, args.init)
  hp = types.SimpleNamespace(
    lr=MAR_TRAIN["blr"] * batch / 256,  # main_mar.py: args.lr = args.blr * eff_batch_size / 256
    min_lr=0.0,
    lr_schedule="constant",
    warmup_epochs=MAR_TRAIN["warmup_epochs"],
    epochs=400,
    epoch=float(MAR_TRAIN["warmup_epochs"]),  # the end of warm-up: lr = args.lr
    grad_clip=MAR_TRAIN["grad_clip"],
    ema_rate=MAR_TRAIN["ema_rate"],
    use_cached=use_cached,
  )
  param_groups = fam.misc.add_weight_decay(model, MAR_TRAIN["weight_decay"])
  optimizer = torch.optim.AdamW(param_groups, lr=hp.lr, betas=MAR_TRAIN["betas"])
  loss_scaler = fam.misc.NativeScalerWithGradNormCount()
  model_params = list(model.parameters())
  ema_params = copy.deepcopy(model_params)
  model.train(True)
  sync(device)
  build_s = time.perf_counter() - t0

  g = torch.Generator(device="cpu").manual_seed(SEED)
  labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
  side = model.seq_h  # latent side: img_size // vae_stride
  if use_cached:
    batch_in = torch.randn((batch, 2 * VAE_KW["embed_dim"], side, side), generator=g).to(device)
  else:
    img = side * MAR_COMMON["vae_stride"]
    batch_in = (torch.rand((batch, 3, img, img), generator=g) * 2 - 1).to(device)

  def step():
    return mar_train_step(
      fam, model, vae, optimizer, loss_scaler, model_params, ema_params, batch_in, labels, hp, device
    )

  scales = [loss_scaler._scaler.get_scale()]
  first, _, out = time_calls(step, 0, device)
  losses, norms = [out[0]], [out[1]]
  scales.append(loss_scaler._scaler.get_scale())
  for _ in range(args.train_warmup):
    loss_value, norm = step()
    losses.append(loss_value)
    norms.append(norm)
    scales.append(loss_scaler._scaler.get_scale())
  times = []
  for _ in range(args.train_steps):
    sync(device)
    t0 = time.perf_counter()
    loss_value, norm = step()
    sync(device)
    times.append(time.perf_counter() - t0)
    losses.append(loss_value)
    norms.append(norm)
    scales.append(loss_scaler._scaler.get_scale())
  norms = [None if n is None else float(n) for n in norms]
  # GradScaler skips the optimiser step (and lowers the scale) when the fp16 gradients overflow.
  skipped = sum(1 for a, b in zip(scales, scales[1:]) if b < a)
  tf = timing_fields(first, times, batch)
  row = dict(
    build_s=round(build_s, 2),
    first_s=tf["first_s"],
    step_s_median=tf["median_s"],
    step_s_min=tf["min_s"],
    step_s_max=tf["max_s"],
    times_s=tf["times_s"],
    img_s=tf["img_s"],
    train_steps=args.train_steps,
    train_warmup=args.train_warmup,
    params=n_params(model),
    params_trainable=n_params(model, trainable_only=True),
    params_diffloss=n_params(model.diffloss),
    params_vae=n_params(vae),
    vae_runs=not use_cached,
    loss_first_last=[round(losses[0], 5), round(losses[-1], 5)],
    all_finite=all(math.isfinite(x) for x in losses),
    grad_norm_last=None if norms[-1] is None else round(norms[-1], 5),
    fp16_loss_scale_last=scales[-1],
    fp16_skipped_steps=skipped,
    lr=optimizer.param_groups[0]["lr"],
    weight_decays=[grp["weight_decay"] for grp in optimizer.param_groups],
    group_sizes=[sum(p.numel() for p in grp["params"]) for grp in optimizer.param_groups],
    official_call=(
      "engine_mar.train_one_epoch body: lr_sched.adjust_learning_rate; no_grad: "
      + (
        "DiagonalGaussianDistribution(moments).sample().mul_(0.2325)"
        if use_cached
        else "vae.encode(images).sample().mul_(0.2325)"
      )
      + "; autocast: loss = model(x, labels); loss.item(); NativeScalerWithGradNormCount(loss, optimizer, "
      "clip_grad=3.0, parameters=model.parameters(), update_grad=True); optimizer.zero_grad(); "
      "torch.cuda.synchronize(); update_ema(ema_params, model_params, rate=0.9999)"
    ),
    exact=dict(
      builder=MAR_VARIANTS[variant]["builder"] or "MAR(...)",
      model_kwargs={
        k: (list(x) if isinstance(x, tuple) else x) for k, x in {**MAR_COMMON, **MAR_VARIANTS[variant]["model"]}.items()
      },
      input_shape=list(batch_in.shape),
      input="random N(0, 1) moments (cached latents)" if use_cached else "random images U(-1, 1)",
      optimizer="torch.optim.AdamW(misc.add_weight_decay(model, 0.02), lr=blr * batch / 256, betas=(0.9, 0.95))",
      blr=MAR_TRAIN["blr"],
      grad_clip=MAR_TRAIN["grad_clip"],
      ema_rate=MAR_TRAIN["ema_rate"],
      diffusion_batch_mul=MAR_COMMON["diffusion_batch_mul"],
      ddp=False,
    ),
  )
  return row


def run_himar_sample(fam, s: dict, args) -> dict:
  device, v = args.device, HIMAR_VARIANTS[s["variant"]]
  seed_all()
  sync(device)
  t0 = time.perf_counter()
  model = build_himar(fam, s["variant"], device, args.init)
  vae = build_vae(fam.vae, device)
  model.eval()
  sync(device)
  build_s = time.perf_counter() - t0
  labels = eval_labels(s["batch"], device)
  call_kw = dict(
    bsz=s["batch"], num_iter=s["steps"], cfg=v["cfg"], re_cfg=v["re_cfg"], cfg_schedule="linear", temperature=1.0
  )

  def call():
    with torch.no_grad(), autocast():
      small_tokens, big_tokens = model.sample_tokens(labels=labels, vq_model=None, **call_kw)
      small_images = vae.decode(small_tokens / LATENT_SCALE)
      small_images = F.interpolate(small_images, size=(64, 64), mode="bicubic")
      big_images = vae.decode(big_tokens / LATENT_SCALE)
      return small_images, big_images

  first, times, (small_images, big_images) = time_calls(call, args.repeats, device)
  kw = {**HIMAR_COMMON, **v["model"]}
  row = dict(
    build_s=round(build_s, 2),
    **timing_fields(first, times, s["batch"]),
    params=n_params(model),
    params_trainable=n_params(model, trainable_only=True),
    params_diffloss=n_params(model.diffloss),
    params_global_head=n_params(model.cond_diffloss),
    params_vae=n_params(vae),
    output_shape=list(big_images.shape),
    output_finite=bool(torch.isfinite(big_images).all() and torch.isfinite(small_images).all()),
    global_head_attention="flash_attn (FAttention)" if fam.dit.USE_FLASH_ATTN else "timm Attention",
    official_call=(
      f"HiMAR.sample_tokens(bsz={s['batch']}, num_iter={s['steps']}, cfg={v['cfg']}, re_cfg={v['re_cfg']}, "
      "cfg_schedule='linear', labels=labels, temperature=1.0, vq_model=None); vae.decode(small / 0.2325); "
      "F.interpolate(.., (64, 64), 'bicubic'); vae.decode(big / 0.2325); under torch.no_grad() and "
      "torch.cuda.amp.autocast()"
    ),
    exact=dict(
      builder=v["builder"] or "HiMAR(...)",
      model_kwargs=kw,
      cfg=v["cfg"],
      re_cfg=v["re_cfg"],
      cfg_schedule="linear",
      temperature=1.0,
      stage1_steps=kw["cond_scale"] * 4,
      stage2_steps=s["steps"],
      stage1_diffusion_steps=int(kw["num_sampling_steps"]),
      stage2_diffusion_steps=model.cond_diffloss.gen_diffusion.num_timesteps,
      guided_rows=2 * s["batch"],
      decode_included="both decodes (small tokens -> bicubic 64 px, full tokens)",
      labels="np.arange(1000).repeat(50)[:batch]",
    ),
  )
  return row


def run_setting(families: dict, s: dict, args) -> dict:
  if s["kind"] == "mar_sample":
    return run_mar_sample(families["mar"], s, args)
  if s["kind"] in ("mar_train", "mar_train_vae"):
    return run_mar_train(families["mar"], s, args)
  return run_himar_sample(families["himar"], s, args)


def setting_name(s: dict) -> str:
  return f"{s['kind']}:{s['variant']}:{s['batch']}" + ("" if s["steps"] is None else f":{s['steps']}")


def device_name(device: str) -> str:
  if device == "cuda":
    return torch.cuda.get_device_name()
  return f"cpu ({platform.processor() or platform.machine()})"


def versions() -> dict:
  out = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__)
  for name in ("timm", "scipy", "einops", "flash_attn", "flash_attn_interface"):
    try:
      out[name] = getattr(importlib.import_module(name), "__version__", "present")
    except ImportError:
      out[name] = None
  out["cuda"] = torch.version.cuda
  out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
  return out


def write_json(args, families: dict, rows: list[dict]) -> None:
  out = dict(
    what=(
      "official PyTorch MAR (LTH14/mar) and Hi-MAR (HiDream-ai/himar): sampling as engine_mar.evaluate times "
      "one batch (decode included, fp16 autocast), MAR train step as engine_mar.train_one_epoch's body "
      "(bench/official_mar_torch.py)"
    ),
    date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    device=device_name(args.device),
    device_kind=args.device,
    versions=versions(),
    flags=dict(
      cudnn_benchmark=torch.backends.cudnn.benchmark,
      matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
      cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
      autocast="torch.cuda.amp.autocast() (float16)",
    ),
    init=args.init,
    repeats=args.repeats,
    settings=args.settings,
    argv=sys.argv[1:],
    official=dict(
      mar_commit=getattr(families.get("mar"), "commit", None),
      himar_commit=getattr(families.get("himar"), "commit", None),
    ),
    notes=[HIMAR_TRAIN_NOTE],
    rows=rows,
  )
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


def print_table(rows: list[dict]) -> None:
  head = f"{'setting':<28}{'params M':>10}{'build s':>9}{'first s':>10}{'median s':>10}{'img/s':>10}{'peak GiB':>10}"
  print("\n" + head)
  for r in rows:
    if "error" in r:
      print(f"{r['setting']:<28}  ERROR {r['error'][:120]}")
      continue
    med = r.get("median_s", r.get("step_s_median"))
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    print(
      f"{r['setting']:<28}{r['params'] / 1e6:>10.2f}{r['build_s']:>9.2f}{r['first_s']:>10.3f}{med:>10.3f}"
      f"{r['img_s']:>10.2f}{peak:>10}"
    )
  print(f"note: {HIMAR_TRAIN_NOTE}")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--mar_dir", help="copy of the needed LTH14/mar files (models/, diffusion/, util/, engine_mar.py)")
  p.add_argument("--himar_dir", help="copy of the needed HiDream-ai/himar files (models/, diffusion/, util/)")
  p.add_argument(
    "--settings",
    default="mar_sample:base:64:64,mar_sample:base:64:256,mar_train:base:64,mar_train_vae:base:64,himar_sample:base:64",
    help="comma-separated kind:variant:batch[:steps]",
  )
  p.add_argument("--repeats", type=int, default=3, help="timed sampling calls after the first")
  p.add_argument("--train_steps", type=int, default=10, help="timed train steps")
  p.add_argument("--train_warmup", type=int, default=2, help="untimed train steps after the first")
  p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
  p.add_argument("--init", choices=("official", "normal"), default="official", help="generator weights")
  p.add_argument("--tiny", action="store_true", help=f"CPU check: --settings {TINY_SETTINGS}, one timed repeat/step")
  p.add_argument("--out", required=True, help="JSON output file")
  args = p.parse_args()
  if args.tiny:
    args.settings, args.repeats, args.train_steps, args.train_warmup = TINY_SETTINGS, 1, 1, 1
  if args.device == "auto":
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
  if args.device == "cuda" and not torch.cuda.is_available():
    p.error("--device cuda: no CUDA device is visible")
  if args.repeats < 1 or args.train_steps < 1 or args.train_warmup < 0:
    p.error("--repeats and --train_steps must be at least 1, --train_warmup at least 0")
  try:
    settings = parse_settings(args.settings)
    if any(s["kind"].startswith("mar") for s in settings):
      check_source_dir(args.mar_dir, "--mar_dir", ("models/mar.py", "models/vae.py", "engine_mar.py", "util/misc.py"))
    if any(s["kind"].startswith("himar") for s in settings):
      check_source_dir(args.himar_dir, "--himar_dir", ("models/himar.py", "models/models.py", "models/vae.py"))
    if importlib.util.find_spec("timm") is None:
      raise ModuleNotFoundError("timm is not installed (both official models import timm)")
  except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
    p.error(str(e))
  out_dir = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(out_dir):
    p.error(f"--out {args.out}: folder {out_dir} does not exist")

  # The official code calls the deprecated torch.cuda.amp entry points; their warnings are noise here.
  warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.cuda\.amp\..*")
  warnings.filterwarnings("ignore", message=r".*CUDA is not available.*")
  torch.backends.cudnn.benchmark = True  # main_mar.py / main_himar.py

  families = {}
  if any(s["kind"].startswith("mar") for s in settings):
    families["mar"] = load_mar(args.mar_dir)
  if any(s["kind"].startswith("himar") for s in settings):
    families["himar"] = load_himar(args.himar_dir)

  rows = []
  with cuda_calls_on_cpu(args.device):
    for s in settings:
      name = setting_name(s)
      print(f"running {name} ...", flush=True)
      free_memory(args.device)
      try:
        row = run_setting(families, s, args)
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if args.device == "cuda" else None
      except Exception as e:  # noqa: BLE001  # one failing setting (OOM, ...) must not lose the others
        row = dict(error=f"{type(e).__name__}: {e}"[:1500], traceback=traceback.format_exc()[-4000:])
        traceback.print_exc()
      row = dict(setting=name, **s, device=device_name(args.device), **row)
      if args.device != "cuda":
        row["smoke_test"] = True
      rows.append(row)
      free_memory(args.device)
      summary = {k: v for k, v in row.items() if k not in ("exact", "traceback", "times_s", "official_call")}
      print(json.dumps(summary), flush=True)
      write_json(args, families, rows)  # after every setting, so a run stopped early keeps what it measured
  print_table(rows)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
