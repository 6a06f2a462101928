"""The shared trainer on the GPUs of one host: every mesh and process layout against one GPU.

  python bench/multi_gpu.py --out bench/results/two_gpu.json      # on a host with 2+ GPUs

Trains a small HMAR (depth 4, width 256, 4 heads of 64, scanned blocks, the tiny 32 px tokenizer;
bf16 compute with f32 parameters, so layouts agree to bf16 rounding of their different reduction
orders; the Triton attention kernels under shard_map) for a few steps with each layout, each as its
own run of `python -m hmar_jax.train` (the 2-process layouts through launch/gpu_host.sh with
NPROC=2), and compares every step's loss with the one-GPU run. Writes the table and every run's log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OVERRIDES = [
  "--config.model.width=256",
  "--config.model.num_heads=4",
  "--config.model.dtype=bfloat16",
  "--config.model.scan_layers=True",
  "--config.optim.schedule=constant",
  "--config.log.every_steps=1",
  "--config.log.tensorboard=False",
  "--config.sample.grid_at_end=False",
  "--config.data.num_examples=512",
]

# name: (processes, mesh, visible GPUs)
LAYOUTS = {
  "1gpu": (1, "(1,1,1)", "0"),
  "dp_1proc": (1, "(2,1,1)", "0,1"),
  "fsdp_1proc": (1, "(1,2,1)", "0,1"),
  "tp_1proc": (1, "(1,1,2)", "0,1"),
  "dp_2proc": (2, "(2,1,1)", "0,1"),
  "fsdp_2proc": (2, "(1,2,1)", "0,1"),
}


def run(name: str, workdir: str, steps: int, batch: int, timeout: int, log_dir: str) -> dict:
  procs, mesh, visible = LAYOUTS[name]
  args = [
    "--config=configs/hmar.py:tiny",
    f"--workdir={workdir}",
    *OVERRIDES,
    f"--config.mesh.shape={mesh}",
    f"--config.train.num_steps={steps}",
    f"--config.train.batch_size={batch}",
    f"--config.data.tokens_cache={os.path.join(os.path.dirname(workdir), 'tokens')}",
  ]
  env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
  if procs == 1:
    cmd = [sys.executable, "-m", "hmar_jax.train", *args]
  else:
    env.update(NPROC=str(procs), SKIP_INSTALL="1", MASTER_PORT="12411")
    cmd = ["bash", "launch/gpu_host.sh", args[0].split("=", 1)[1], workdir, *args[2:]]
  t0 = time.time()
  with open(os.path.join(log_dir, f"{name}.log"), "w") as log:
    try:
      code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
      code = "timeout"
  row = {
    "layout": name,
    "processes": procs,
    "mesh": mesh,
    "gpus": len(visible.split(",")),
    "exit": code,
    "seconds": round(time.time() - t0, 1),
  }
  metrics = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics):
    with open(metrics) as f:
      rows = [json.loads(line) for line in f]
    row["losses"] = [r["loss"] for r in rows]
    row["img_s"] = [round(r.get("img_s", 0), 1) for r in rows]
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layouts", default=",".join(LAYOUTS))
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--timeout", type=int, default=180)
  p.add_argument("--workdir", default="/tmp/multi_gpu")
  p.add_argument("--out", required=True)
  p.add_argument("--logs", default=None, help="folder for each run's log (default: beside --out)")
  a = p.parse_args()
  shutil.rmtree(a.workdir, ignore_errors=True)
  os.makedirs(a.workdir)
  log_dir = a.logs or os.path.dirname(os.path.abspath(a.out))
  os.makedirs(log_dir, exist_ok=True)
  rows = []
  for name in a.layouts.split(","):
    rows.append(run(name, os.path.join(a.workdir, name), a.steps, a.batch, a.timeout, log_dir))
    print(json.dumps(rows[-1]), flush=True)
  ref = next((r for r in rows if r["layout"] == "1gpu" and "losses" in r), None)
  for r in rows:
    if ref and "losses" in r and len(r["losses"]) == len(ref["losses"]):
      r["max_rel_diff_vs_1gpu"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"], strict=True))
  print(f"\n{'layout':12} {'procs':>5} {'mesh':9} {'exit':>5} {'max rel diff':>13}  losses")
  for r in rows:
    diff = r.get("max_rel_diff_vs_1gpu")
    print(
      f"{r['layout']:12} {r['processes']:>5} {r['mesh']:9} {str(r['exit']):>5} "
      f"{'' if diff is None else f'{diff:.2e}':>13}  {[round(x, 5) for x in r.get('losses', [])]}"
    )
  with open(a.out, "w") as f:
    json.dump(
      {
        "what": "bench/multi_gpu.py: the shared trainer on 2 GPUs, each layout vs one GPU",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": "configs/hmar.py:tiny " + " ".join(OVERRIDES),
        "steps": a.steps,
        "batch": a.batch,
        "rows": rows,
      },
      f,
      indent=1,
    )


if __name__ == "__main__":
  main()
