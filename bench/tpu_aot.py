"""Per-chip memory and a compute bound of the official recipes compiled for TPU slices (no TPU needed).

  python bench/tpu_aot.py --settings hmar:d16:v5p:2x2x1,hmar:d24:v6e:2x2 --out bench/results/tpu_aot.json

Each setting compiles the shared trainer's step for the topology with hmar_jax.aot, at the official
global batch (768 for d16-d24, 1024 for d30) unless --batch is given, and records what
hmar_jax.aot.step_report says (memory per chip against HBM, model FLOPs, the bound on images/s), or
the compile's error. Runs on a CPU host with libtpu installed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hmar_jax import aot, config_utils  # noqa: E402


def measure(kind: str, variant: str, topology: str, batch: int | None) -> dict:
  config = config_utils.load_config_file(f"configs/{kind}.py:{variant}")
  if batch:  # otherwise the recipe's own: 768 for d16-d24, 1024 for d30
    config.train.batch_size = batch
  row = {"kind": kind, "variant": variant, "topology": topology, "global_batch": int(config.train.batch_size)}
  t0 = time.time()
  try:
    devices = aot.tpu_devices(topology)
    compiled, trainer = aot.compile_train_step(config, devices)
    report = aot.step_report(compiled, devices, row["global_batch"], trainer.task.step_flops(row["global_batch"]))
    row.update(report, mesh=dict(trainer.mesh.shape))
  except Exception as e:  # a setting that does not compile is a result too
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  row["compile_s"] = round(time.time() - t0, 1)
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--settings", required=True, help="kind:variant:chip:topology, comma-separated")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--out", default=None)
  a = p.parse_args()
  rows = []
  for setting in a.settings.split(","):
    kind, variant, chip, shape = setting.split(":")
    rows.append(measure(kind, variant, f"{chip}:{shape}", a.batch))
    r = rows[-1]
    if "error" in r:
      print(f"{kind} {variant} {r['topology']}: {r['error']}", flush=True)
    else:
      print(
        f"{kind:4} {variant:8} {r['topology']:10} batch {r['global_batch']:5} mesh {r['mesh']} "
        f"{r['total_gib']:6.1f} / {r['hbm_gib']:.0f} GiB per chip, fits {r['fits']}, "
        f"<= {r['roofline_img_s']:.0f} img/s (compute bound), compiled in {r['compile_s']} s",
        flush=True,
      )
    if a.out:
      with open(a.out, "w") as f:
        json.dump(
          {
            "what": "official recipes compiled for TPU slices on a CPU host (bench/tpu_aot.py, hmar_jax.aot)",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "jax": jax.__version__,
            "rows": rows,
          },
          f,
          indent=1,
        )


if __name__ == "__main__":
  main()
