"""Training tasks: each supplies its model's variables, its loss, its batch preparation and data.

tokenizer      the multi-scale VQ tokenizer (tokenizer.py)
nsp            next-scale prediction, HMAR or VAR (next_scale.py)
mask_finetune  HMAR masked-prediction finetuning (mask_finetune.py)
kl_tokenizer   MAR's KL VAE tokenizer (kl_tokenizer.py)
mar            MAR: masked autoregression with a diffusion loss over KL-VAE tokens (mar.py)
himar          Hi-MAR: MAR with low-resolution pivots and a diffusion-transformer head (himar.py)
"""

from hmar_jax.training.tasks.himar import HiMARTask
from hmar_jax.training.tasks.kl_tokenizer import KLTokenizerTask
from hmar_jax.training.tasks.mar import MARTask
from hmar_jax.training.tasks.mask_finetune import MaskFinetuneTask
from hmar_jax.training.tasks.next_scale import NextScaleTask
from hmar_jax.training.tasks.tokenizer import TokenizerTask

TASKS = {
  "tokenizer": TokenizerTask,
  "nsp": NextScaleTask,
  "mask_finetune": MaskFinetuneTask,
  "kl_tokenizer": KLTokenizerTask,
  "mar": MARTask,
  "himar": HiMARTask,
}

__all__ = ["TASKS", "TokenizerTask", "NextScaleTask", "MaskFinetuneTask", "KLTokenizerTask", "MARTask", "HiMARTask"]
