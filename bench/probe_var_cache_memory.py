"""Where VAR's cached sampling steps hold memory: each compiled program's memory analysis (arguments,
outputs, donated aliases, scratch) and its largest buffers from XLA's buffer assignment.

  python bench/probe_var_cache_memory.py --variant d24 --batch 64 [--dump DIR]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import os
import re
import shutil
import sys

p = argparse.ArgumentParser()
p.add_argument("--variant", default="d16")
p.add_argument("--depth", type=int, default=None)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--dump", default=None, help="keep the last scale's buffer assignment (gzipped) here")
a = p.parse_args()
if a.dump:
  os.makedirs("/tmp/xla_dump", exist_ok=True)
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_dump_to=/tmp/xla_dump --xla_dump_hlo_module_re=.*nsp_cached.*"
  )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sample as bench  # noqa: E402

from hmar_jax.sample import _abstract_model  # noqa: E402
from hmar_jax.sampling.sampler import Sampler  # noqa: E402
from hmar_jax.tokenizer.vqvae import abstract_vqvae  # noqa: E402

config = bench._config("var", a.variant)
mc = config.model
mc.scan_layers = True
if a.depth:
  mc.depth = a.depth
sampler = Sampler(_abstract_model(mc), abstract_vqvae(config.tokenizer.config))
lowered = sampler._lower_all(jnp.zeros((a.batch,), jnp.int32), dict(cfg=1.5, top_k=900, top_p=0.96))
G = 2**30
print(f"{jax.devices()[0].device_kind} VAR {a.variant} depth {mc.depth} batch {a.batch}")
print(f"{'program':<28}{'args':>8}{'out':>8}{'alias':>8}{'temp':>8}  GiB")
for key, low in lowered.items():
  m = low.compile().memory_analysis()
  name = key[0] + "".join(f" {k}={v}" for k, v in key[1])
  print(
    f"{name:<28}{m.argument_size_in_bytes / G:8.3f}{m.output_size_in_bytes / G:8.3f}"
    f"{m.alias_size_in_bytes / G:8.3f}{m.temp_size_in_bytes / G:8.3f}"
  )
if a.dump:
  files = glob.glob("/tmp/xla_dump/*nsp_cached*buffer-assignment.txt")
  files.sort(key=os.path.getsize)
  for f in files[-1:]:
    with open(f) as handle:
      text = handle.read()
    sizes = sorted(
      ((int(m.group(2)), m.group(0)[:160]) for m in re.finditer(r"allocation (\d+): size (\d+)[^\n]*", text)),
      reverse=True,
    )
    print(os.path.basename(f))
    for size, line in sizes[:12]:
      print(f"  {size / G:8.3f} GiB  {line}")
    os.makedirs(a.dump, exist_ok=True)
    with open(f, "rb") as src, gzip.open(os.path.join(a.dump, "var_last_scale_buffer_assignment.txt.gz"), "wb") as dst:
      shutil.copyfileobj(src, dst)
