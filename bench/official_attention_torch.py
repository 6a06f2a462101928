"""Times the official HMAR PyTorch/Triton block-sparse kernel in the benchmark's setting.

Run in its own process (PyTorch and JAX would both claim the GPU). The official sources are
read from --ref_dir (a copy of HMAR's `attn` package next to it; not part of this repo).
float16 only: the official kernel hard-codes float16 probabilities. Times: triton do_bench
medians in ms, same B, H, D and layouts as bench/attention.py.

  python bench/official_attention_torch.py --ref_dir .whl/official --out official.json
"""

import argparse
import json
import sys
import time

import torch
import triton

LAYOUTS = {
  680: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
  2240: [1, 2, 3, 4, 6, 9, 13, 18, 24, 32],
  9451: [1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64],
}
B, H, D = 8, 16, 64


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--ref_dir", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  sys.path.insert(0, args.ref_dir)
  # The official `attn` package is importable only once --ref_dir is on sys.path.
  from attn.block_sparse_attn_interface import BlockSparseAttention

  rows = []
  for length, pn in LAYOUTS.items():
    for pattern in ("block_diagonal", "block_causal"):
      row = dict(L=length, pattern=pattern, dtype="float16")
      try:
        attn = BlockSparseAttention([p * p for p in pn], device="cuda", sparsity_pattern=pattern)
        q, k, v = (
          torch.randn((B, H, length, D), dtype=torch.float16, device="cuda", requires_grad=True) for _ in range(3)
        )
        g = torch.randn_like(q)
        scale = D**-0.5
        fwd = lambda attn=attn, q=q, k=k, v=v, scale=scale: attn(q, k, v, scale)
        row["official_fwd_ms"] = triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")

        def fwdbwd(attn=attn, q=q, k=k, v=v, scale=scale, g=g):
          attn(q, k, v, scale).backward(g)

        row["official_fwdbwd_ms"] = triton.testing.do_bench(
          fwdbwd, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median"
        )
      except Exception as e:  # pylint: disable=broad-except
        row["official"] = f"FAIL {type(e).__name__}: {e}"[-1500:]
      print(row, flush=True)
      rows.append(row)
  with open(args.out, "w") as f:
    json.dump(
      dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC"),
        rows=rows,
      ),
      f,
      indent=1,
    )


if __name__ == "__main__":
  main()
