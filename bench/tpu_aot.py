"""Per-chip memory and a compute bound of the official recipes compiled for TPU slices (no TPU needed).

  python bench/tpu_aot.py --settings hmar:d16:v5p:2x2x1,hmar:d24:v6e:2x2 --out bench/results/tpu_aot.json
  python bench/tpu_aot.py --search hmar:d16,hmar:d20 --chips v5p,v5e,v6e --out bench/results/tpu_aot.json
  python bench/tpu_aot.py --sampler hmar_mask:d16:v5p:2x2x1 --out bench/results/tpu_aot.json
  python bench/tpu_aot.py --table bench/results/tpu_aot.json

--search finds, per recipe and chip, the smallest slice of SLICES whose compiled step fits the
chip's HBM, trying sizes upward from the smallest one not already ruled out (a deeper model of the
same kind starts where the shallower one fitted; VAR starts one size below HMAR's fit); every try
is recorded. --sampler compiles every program of the sampler (hmar_jax.aot.compile_sampler) at 64 images per
chip. --out files are extended, not replaced; --table prints the README table from one.

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


# Slice sizes tried by --search, smallest first (Cloud TPU slice shapes: v5p 3D tori, v5e / v6e 2D).
SLICES = {
  "v5p": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8"],
  "v5e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
  "v6e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
}


def chips_of(shape: str) -> int:
  n = 1
  for d in shape.split("x"):
    n *= int(d)
  return n


def print_row(r: dict) -> None:
  what = f"{r['kind']:9} {r['variant']:8} {r['topology']:10}"
  if "error" in r:
    print(f"{what} {r['error']}", flush=True)
  elif r.get("sampler"):
    print(
      f"{what} sampler, {r['global_batch']} images, {r['programs']} programs: at most {r['total_gib']:6.1f} / {r['hbm_gib']:.0f} GiB per chip, "
      f"fits {r['fits']}, compiled in {r['compile_s']} s",
      flush=True,
    )
  else:
    print(
      f"{what} batch {r['global_batch']:5} mesh {r['mesh']} "
      f"{r['total_gib']:6.1f} / {r['hbm_gib']:.0f} GiB per chip, fits {r['fits']}, "
      f"<= {r['roofline_img_s']:.0f} img/s (compute bound), compiled in {r['compile_s']} s",
      flush=True,
    )


def measure_sampler(kind: str, variant: str, topology: str, batch_per_chip: int = 64) -> dict:
  config = config_utils.load_config_file(f"configs/{kind}.py:{variant}")
  row = {
    "kind": kind,
    "variant": variant,
    "topology": topology,
    "sampler": True,
    "mask_schedule": str(config.sample.mask_schedule),
    "batch_per_chip": batch_per_chip,
  }
  t0 = time.time()
  try:
    devices = aot.tpu_devices(topology)
    pieces, mesh = aot.compile_sampler(config, devices, batch_per_chip)
    row.update(aot.sampler_report(pieces, devices, batch_per_chip * len(devices)))
    row["global_batch"], row["mesh"] = batch_per_chip * len(devices), dict(mesh.shape)
  except Exception as e:
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  row["compile_s"] = round(time.time() - t0, 1)
  return row


def fits(row: dict) -> bool:
  return "error" not in row and bool(row.get("fits"))


def search(kind: str, variant: str, chip: str, start: int, rows: list, save) -> int:
  """Index in SLICES[chip] of the smallest fitting slice at or above `start` (len(SLICES[chip]): none)."""
  shapes = SLICES[chip]
  for i in range(start, len(shapes)):
    rows.append(measure(kind, variant, f"{chip}:{shapes[i]}", None))
    print_row(rows[-1])
    save()
    if fits(rows[-1]):
      rows[-1]["smallest_fit"] = True
      save()
      return i
  return len(shapes)


def table(rows: list) -> str:
  """The README table: per recipe, the smallest fitting slice of each chip with memory and img/s bound."""
  best = {}
  for r in rows:
    if fits(r) and not r.get("sampler"):
      chip, shape = r["topology"].split(":")
      key = (r["kind"], r["variant"], chip)
      if key not in best or chips_of(shape) < chips_of(best[key]["topology"].split(":")[1]):
        best[key] = r
  recipes = sorted({(k, v) for k, v, _ in best}, key=lambda kv: (kv[0], "_512" in kv[1], int(kv[1][1:3])))
  lines = [
    "| recipe | global batch | " + " | ".join(f"{c}: chips, GiB per chip, img/s bound" for c in SLICES) + " |",
    "| --- | --- | " + " | ".join("---" for _ in SLICES) + " |",
  ]
  for kind, variant in recipes:
    cells, batch = [], None
    for chip in SLICES:
      r = best.get((kind, variant, chip))
      if r is None:
        tried = [x["topology"] for x in rows if (x["kind"], x["variant"]) == (kind, variant) and not x.get("sampler")]
        tried = [t.split(":")[1] for t in tried if t.startswith(chip + ":")]
        cells.append(f"none up to {max(tried, key=chips_of)}" if tried else "not compiled")
        continue
      batch = r["global_batch"]
      cells.append(
        f"{r['topology']} ({r['chips']}), {r['total_gib']:.1f} / {r['hbm_gib']:.0f}, {r['roofline_img_s']:.0f}"
      )
    lines.append(f"| {kind.upper()} {variant} | {batch} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--settings", default="", help="kind:variant:chip:topology, comma-separated")
  p.add_argument("--search", default="", help="kind:variant, comma-separated (in order: deeper after shallower)")
  p.add_argument("--chips", default="v5p,v5e,v6e")
  p.add_argument("--sampler", default="", help="kind:variant:chip:topology, comma-separated")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--out", default=None)
  p.add_argument("--table", default=None, help="print the README table of this results file and exit")
  a = p.parse_args()
  if a.table:
    with open(a.table) as f:
      print(table(json.load(f)["rows"]))
    return
  rows = []
  if a.out and os.path.exists(a.out):
    with open(a.out) as f:
      rows = json.load(f)["rows"]
  first_new = len(rows)

  def save():
    if a.out:
      with open(a.out, "w") as f:
        json.dump(
          {
            "what": "official recipes compiled for TPU slices on a CPU host (bench/tpu_aot.py, hmar_jax.aot)",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "jax": jax.__version__,
            "host": f"{os.cpu_count()} CPU cores",
            "note": "'error' rows are the TPU compiler's own out-of-memory refusals (its buffers exceed HBM); "
            "roofline_img_s is an upper bound from the model FLOPs and the chip's bf16 peak; no TPU has run "
            "any of these",
            "rows": rows,
          },
          f,
          indent=1,
        )

  for setting in filter(None, a.settings.split(",")):
    kind, variant, chip, shape = setting.split(":")
    rows.append(measure(kind, variant, f"{chip}:{shape}", a.batch))
    print_row(rows[-1])
    save()
  for chip in filter(None, a.chips.split(",")) if a.search else ():
    start = {}
    for recipe in a.search.split(","):
      kind, variant = recipe.split(":")
      res = "512" if variant.endswith("_512") else "256"
      begin = start.get((kind, res), 0)
      if kind == "var" and ("hmar", variant) in start:  # VAR has no masked branch: at most HMAR's size
        begin = max(0, start[("hmar", variant)] - 1)
      ruled_out = [  # slices this recipe was already found too small for (earlier runs of this file)
        SLICES[chip].index(r["topology"].split(":")[1])
        for r in rows
        if (r["kind"], r["variant"]) == (kind, variant)
        and r["topology"].split(":")[0] == chip
        and r["topology"].split(":")[1] in SLICES[chip]
        and not r.get("sampler")
        and not fits(r)
      ]
      begin = max([begin] + [i + 1 for i in ruled_out])
      fitted = [  # slices this recipe already fitted on
        SLICES[chip].index(r["topology"].split(":")[1])
        for r in rows
        if (r["kind"], r["variant"]) == (kind, variant)
        and r["topology"].split(":")[0] == chip
        and r["topology"].split(":")[1] in SLICES[chip]
        and not r.get("sampler")
        and fits(r)
      ]
      # When the smallest fit is already known there is nothing to compile.
      known = fitted and min(fitted) <= begin
      found = min(fitted) if known else search(kind, variant, chip, begin, rows, save)
      start[(kind, res)] = found
      start[(kind, variant)] = found
  for setting in filter(None, a.sampler.split(",")):
    kind, variant, chip, shape = setting.split(":")
    rows.append(measure_sampler(kind, variant, f"{chip}:{shape}"))
    print_row(rows[-1])
    save()
  if len(rows) > first_new:
    print(table(rows))


if __name__ == "__main__":
  main()
