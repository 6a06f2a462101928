"""Next-scale training of the tiny HMAR on the built-in procedural data (CPU minutes).

  python -m hmar_jax.train --config=configs/train_hmar_tiny.py --workdir=runs/hmar_nsp \
      --config.tokenizer.checkpoint=runs/tokenizer_tiny/tokenizer

The tokenizer is the one of configs/tokenizer_tiny.py (its checkpoint carries its config; the
transformer's patch_nums / vocab / Cvae must match it, which is checked before training).

Official recipe (HMAR config/experiment/hmar-train-d*.yaml, utils/arg_util.py): AdamW
(0.9, 0.95), lr = base_lr * batch / 256, wd 0.05, grad clip 2, 'lin0' schedule with 2%
warmup from 0.005x, final lr wpe x peak, 'lognorm' loss weights. The tiny run uses a larger
base_lr than the official 1e-4 (a small batch, few steps).
"""
import ml_collections

from hmar_jax import config_utils
from hmar_jax.models.config import model_config


def tiny_tokenizer():
  """The VQVAE of configs/tokenizer_tiny.py (32 px, patch_nums 1,2,3,4,6,8, V 256, Cvae 16)."""
  return config_utils.sibling(__file__, "tokenizer_tiny").get_config().model


def tiny_transformer(kind: str = "hmar"):
  """A CPU-sized HMAR / VAR over the tokenizer_tiny scales: depth 4, width 128, 4 heads,
  2 masked-prediction blocks (HMAR)."""
  tok = tiny_tokenizer()
  return model_config(4, kind=kind, patch_nums=tuple(tok.patch_nums), width=128, num_heads=4,
                      vocab_size=tok.vocab_size, cvae=tok.z_channels, num_classes=10,
                      mask_layers=2 if kind == "hmar" else 0)


def train_config(**overrides) -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.seed = 0
  t.batch_size = 32
  t.num_steps = 600
  t.base_lr = 8e-3              # peak = base_lr * batch / 256 = 1e-3 (official base 1e-4 at batch 768)
  t.lr_schedule = "lin0"        # official default: warmup, hold 5%, linear decay
  t.warmup_steps = -1           # < 0: warmup_frac of num_steps (official wp = ep / 50)
  t.warmup_frac = 0.02
  t.wp0 = 0.005
  t.wpe = 0.1                   # official training configs: wpe 0.1
  t.weight_decay = 0.05
  t.weight_decay_end = 0.05     # official twde defaults to twd (constant)
  t.grad_clip = 2.0
  t.loss_weighting = "lognorm"  # 'uniform' (VAR), 'equal', 'lognorm' (HMAR)
  t.label_smoothing = 0.0
  t.ema_decay = 0.0             # > 0: keep an EMA of the params (saved instead of the raw ones)
  t.log_every = 50
  t.checkpoint_every = 200
  t.max_to_keep = 2
  t.update(overrides)
  return t


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "nsp"
  config.model = tiny_transformer("hmar")
  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.checkpoint = ""      # a save_vqvae directory; '' = randomly initialised (smoke tests)
  config.tokenizer.seed = 0
  config.tokenizer.config = tiny_tokenizer()
  config.data = ml_collections.ConfigDict()
  config.data.source = "procedural"     # 'procedural' | 'folder' (data.path) | 'tfds' (data.name, split, data_dir)
  config.data.num_examples = 2000
  config.data.num_classes = config.model.num_classes
  config.data.seed = 0
  config.data.tokens_cache = ""         # '' = workdir/tokens.npz; may name another run's cache
  config.train = train_config()
  config.sample = ml_collections.ConfigDict()
  config.sample.grid_at_end = True      # write workdir/samples.png (one row per class) after training
  config.sample.per_class = 8
  config.sample.seed = 0
  config.sample.cfg = 1.5
  config.sample.top_k = 0
  config.sample.top_p = 0.0
  config.sample.mask_schedule = "none"
  return config
