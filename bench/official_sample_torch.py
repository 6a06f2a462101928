"""Times the official HMAR PyTorch sampler (NVlabs/HMAR `HMAR.generate`), for comparison with bench/sample.py.

Run in its own process (PyTorch and JAX would both claim the GPU); the official sources are read
from --ref_dir as in bench/official_train_step_torch.py.

  python bench/official_sample_torch.py --ref_dir .whl/official_hmar \\
      --settings hmar:16:256:64,var:16:256:64 --out /tmp/official_sample.json

What runs, per setting kind:depth:resolution:batch:
  * model: `models.build_vae_hmar` as the official benchmark/inference.py builds it (width 64 * depth,
    heads = depth, the resolution's patch_nums), every parameter and buffer of floating dtype drawn from
    N(0, 0.02): the script's own `torch.rand_like` weights make the official top-k / top-p multinomial
    fail with a device-side assert.
  * kind 'hmar': `generate(mask=True, kv_cache=False)` with the official default mask schedule at 256 px
    and next-scale only (one step per scale) at other resolutions, as bench/sample.py runs ours; each
    scale attends only to itself. Kind 'var': `generate(mask=False, kv_cache=True)`: VAR's way, one pass
    per scale over a KV cache of all earlier scales.
  * guidance 1.5, top-k 900, top-p 0.96, image decode included; float32 with TF32 matmuls (the official
    scripts' precision); labels b % 1000.
  * timing: the first call alone (first_call_s), then the median of --repeats calls, each between two
    `torch.cuda.synchronize()`; peak memory from `torch.cuda.max_memory_allocated()`, reset per setting.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official_train_step_torch import PATCH_NUMS, free_memory, import_official, quiet_official_print  # noqa: E402

# Official default schedule at 256 px: tokens fixed at each step of each scale (first entry: the
# next-scale step), the same as hmar_jax.sampling.schedules.DEFAULT_MASK_SCHEDULE_256.
DEFAULT_SCHEDULE_256 = [[1], [1, 3], [1, 1, 2, 5], [16], [25], [36], [64], [100], [169], [256]]


def parse_settings(text: str) -> list[tuple[str, int, int, int]]:
  out = []
  for item in text.split(","):
    kind, depth, res, batch = item.split(":")
    if kind not in ("hmar", "var") or int(res) not in PATCH_NUMS:
      raise ValueError(f"bad setting {item!r}: kind hmar|var, resolution one of {sorted(PATCH_NUMS)}")
    out.append((kind, int(depth), int(res), int(batch)))
  return out


def run_setting(off, kind: str, depth: int, res: int, batch: int, repeats: int) -> dict:
  free_memory("cuda")
  patch_nums = PATCH_NUMS[res]
  t0 = time.time()
  with quiet_official_print():
    vae, hmar = off.build_vae_hmar("cuda", patch_nums=patch_nums, depth=depth)
  gen = torch.Generator(device="cuda").manual_seed(0)
  with torch.no_grad():
    for module in (vae, hmar):
      for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
          t.normal_(0.0, 0.02, generator=gen)
  vae.eval()
  hmar.eval()
  torch.cuda.synchronize()
  build_s = time.time() - t0
  if kind == "hmar":
    schedule = DEFAULT_SCHEDULE_256 if res == 256 else [[pn * pn] for pn in patch_nums]
    kw = dict(mask=res == 256, mask_schedule=schedule, kv_cache=False)
  else:
    kw = dict(mask=False, mask_schedule=None, kv_cache=True)
  labels = torch.arange(batch, device="cuda") % 1000

  def call(seed):
    with torch.inference_mode():
      return hmar.generate(batch, labels, g_seed=seed, cfg=1.5, top_k=900, top_p=0.96, **kw)

  t0 = time.time()
  call(0)
  torch.cuda.synchronize()
  first_call_s = time.time() - t0
  times = []
  for r in range(repeats):
    torch.cuda.synchronize()
    t0 = time.time()
    call(r + 1)
    torch.cuda.synchronize()
    times.append(time.time() - t0)
  ms = 1e3 * statistics.median(times)
  row = {
    "impl": f"official_torch_{kind}",
    "kind": kind,
    "depth": depth,
    "res": res,
    "batch": batch,
    "mask": kw["mask"],
    "kv_cache": kw["kv_cache"],
    "build_s": round(build_s, 2),
    "first_call_s": round(first_call_s, 2),
    "ms": round(ms, 2),
    "img_s": round(batch / (ms / 1e3), 2),
    "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
  }
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ref_dir", required=True)
  p.add_argument("--settings", default="hmar:16:256:64,var:16:256:64")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=None)
  a = p.parse_args()
  settings = parse_settings(a.settings)
  torch.backends.cuda.matmul.allow_tf32 = True  # utils/arg_util.py: tf32 on
  torch.backends.cudnn.allow_tf32 = True
  off = import_official(a.ref_dir, "cuda")
  import models  # noqa: PLC0415  # the official package, importable after import_official

  off.build_vae_hmar = models.build_vae_hmar
  rows = []
  for kind, depth, res, batch in settings:
    try:
      row = run_setting(off, kind, depth, res, batch, a.repeats)
    except Exception as e:  # noqa: BLE001  # one failing setting must not lose the others
      row = {"impl": f"official_torch_{kind}", "kind": kind, "depth": depth, "res": res, "batch": batch}
      row["error"] = f"{type(e).__name__}: {e}"[:500]
    rows.append(row)
    if "error" in row:
      print(f"official {kind} d{depth} {res}px batch {batch}: {row['error']}", flush=True)
    else:
      print(
        f"official {kind:4} d{depth} {res:4}px batch {batch:3}: first call {row['first_call_s']:6.1f} s, "
        f"{row['ms']:8.1f} ms/batch, {row['img_s']:7.1f} img/s, peak {row['peak_gib']} GiB",
        flush=True,
      )
    if a.out:
      with open(a.out, "w") as f:
        json.dump(
          {
            "what": "official NVlabs/HMAR HMAR.generate (bench/official_sample_torch.py)",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "rows": rows,
          },
          f,
          indent=1,
        )


if __name__ == "__main__":
  main()
