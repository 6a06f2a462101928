"""Checks on the machine at hand that the sampler's program cache (hmar_jax/sampling/program_cache.py)
round-trips: a sampler saves its programs, a second one reads them back and gives the same images.

  python bench/probe_program_cache.py /tmp/jax_cache     # twice with the same folder

Run it twice with the same JAX cache folder: the second run's programs come from JAX's persistent
cache before they are saved again, the case XLA's CPU client gets wrong. Batch 3 is compiled after
batch 4's programs ran. A small HMAR of head dim 64 (the GPU attention kernels' smallest) over the
tiny tokenizer. Prints one line `PROBE {json}`.
"""

import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from sampling_helpers import random_module, tiny_vqvae  # noqa: E402

from hmar_jax.models.config import tiny_model_config  # noqa: E402
from hmar_jax.models.transformer import ScaleTransformer  # noqa: E402
from hmar_jax.sampling import Sampler  # noqa: E402

KW = dict(cfg=1.5, top_k=5, top_p=0.9, mask_schedule=[[1], [1, 3], [1, 2, 6], [25], [64]])


def main(jax_cache: str) -> dict:
  jax.config.update("jax_compilation_cache_dir", jax_cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  config = tiny_model_config("hmar")
  config.width = 128  # head dim 64 over its 2 heads
  models = random_module(lambda: ScaleTransformer(config, rngs=nnx.Rngs(0)), 1), tiny_vqvae(0)
  out = {"platform": jax.devices()[0].platform}
  for batch in (4, 3):
    labels = np.arange(batch, dtype=np.int32)
    folder = os.path.join(jax_cache, "programs_probe")
    shutil.rmtree(folder, ignore_errors=True)
    first = Sampler(*models, program_cache=folder)
    first.precompile(labels, workers=4, **KW)
    written = first._program_cache_write.result()
    later = Sampler(*models, program_cache=folder)
    later.precompile(labels, workers=4, **KW)
    try:
      got = np.asarray(later.sample(labels, 3, **KW))
      same = bool(np.array_equal(got, np.asarray(first.sample(labels, 3, **KW))))
    except Exception as e:  # the failure is the finding
      same = f"{type(e).__name__}: {str(e)[:300]}"
    out[f"batch{batch}"] = {"write_s": written, "read": later.precompile_report, "same_images": same}
  return out


if __name__ == "__main__":
  print("PROBE " + json.dumps(main(sys.argv[1])), flush=True)
