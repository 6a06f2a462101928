"""Builds bench/results/attention.json from the raw device outputs (run from the repo root).

Final figures: run 8 (L = 680, 2240; the official kernel timed on the same machine) and run 9
(L = 9451; run 8 hit its time limit there), both 'auto' = the configs then shipped, which
launched the forward one (batch, head) pair at a time. Run 10 then timed the forward launched in
groups of 16 pairs (now shipped) against ungrouped, same tiles, same run: 'forward_groups_run10'.
Sweeps that chose the configs: runs 4-6 and 10. GPU correctness: run 7 (all 24 cases of
bench/gpu_check_attention.py) and run 10 (grouped forward). Runs 1-3 measured the previous version
(global tile grid); their summary is kept under 'previous_version'.
"""
import json

from pallas_kernels import tiling

R = "bench/results/raw/"
load = lambda name: json.load(open(R + name))
r8, r9, off, chk = (load("attention_run8.json"), load("attention_run9.json"),
                    load("official_run8.json"), load("gpu_check_run7.json"))
anchors = json.load(open("../shared/anchors/attn_h100_2026-11-24.json"))
previous = json.load(open(R + "previous_summary.json"))
LAYOUTS = {680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
           9451: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)}
B, H, D = 8, 16, 64


def row(run, length, pattern, dtype="bfloat16"):
  for r in run["rows"]:
    if r["L"] == length and r["pattern"] == pattern and r["dtype"] == dtype:
      return r
  raise KeyError((length, pattern, dtype))


summary = []
for length in (680, 2240, 9451):
  run, run_name = (r9, "run9") if length == 9451 else (r8, "run8")
  rate = run["matmul_tflops_bf16"]
  for pattern in ("block_diagonal", "block_causal"):
    x, x16 = row(run, length, pattern), row(run, length, pattern, "float16")
    anchor = [a for a in anchors["rows"] if a["L"] == length and a["pattern"] == pattern][0]
    same = [o for o in off["rows"] if o["L"] == length and o["pattern"] == pattern][0]
    floor = tiling.touched_tile_elements(LAYOUTS[length], pattern, 64) * 4 * B * H * D / (
        rate * 1e12) * 1e3
    fwd, fb = x["triton_auto_fwd_ms"], x["triton_auto_fwdbwd_ms"]
    base = {k: x.get(k) for k in ("xla_fwd_ms", "xla_fwdbwd_ms", "cudnn_fwd_ms", "cudnn_fwdbwd_ms",
                                  "tokamax_triton_fwd_ms", "tokamax_triton_fwdbwd_ms",
                                  "tokamax_mosaic_fwd_ms", "tokamax_mosaic_fwdbwd_ms")}
    summary.append(dict(
        L=length, pattern=pattern, dtype="bfloat16", source=run_name,
        matmul_tflops_bf16=rate, ours_fwd_ms=fwd, ours_fwdbwd_ms=fb,
        ours_float16_fwd_ms=x16["triton_auto_fwd_ms"],
        ours_float16_fwdbwd_ms=x16["triton_auto_fwdbwd_ms"],
        tile_floor_fwd_ms=floor, tile_floor_fwdbwd_ms=3.5 * floor,
        fwd_fraction_of_tile_floor=floor / fwd, fwdbwd_fraction_of_tile_floor=3.5 * floor / fb,
        official_fwd_ms_anchor=anchor["official_fwd_ms"],
        official_fwdbwd_ms_anchor=anchor["official_fwdbwd_ms"],
        official_fwd_ms_run8=same.get("official_fwd_ms"),
        official_fwdbwd_ms_run8=same.get("official_fwdbwd_ms"),
        speedup_fwdbwd_vs_official_anchor=anchor["official_fwdbwd_ms"] / fb,
        speedup_fwd_vs_official_anchor=anchor["official_fwd_ms"] / fwd,
        **base))

r10 = load("attention_run10_sweep.json")
groups = []
for length in (680, 2240, 9451):
  tile = "fwd128x64w8" if length >= 4096 else "fwd64x64w4"
  for pattern in ("block_diagonal", "block_causal"):
    x = row(r10, length, pattern)
    floor = tiling.touched_tile_elements(LAYOUTS[length], pattern, 64) * 4 * B * H * D / (
        r10["matmul_tflops_bf16"] * 1e12) * 1e3
    g1, g16 = x[f"triton_{tile}_fwd_ms"], x[f"triton_{tile}_g16_fwd_ms"]
    groups.append(dict(L=length, pattern=pattern, tiles=tile, ungrouped_fwd_ms=g1,
                       grouped16_fwd_ms=g16, tile_floor_fwd_ms=floor,
                       grouped16_fraction_of_tile_floor=floor / g16,
                       ungrouped_fraction_of_tile_floor=floor / g1))

out = dict(
    description=("Block-sparse scale attention on one H100 (B8 H16 D64), ms per call, shipped "
                 "configs. See bench/NOTES_attention.md."),
    device=r8["device"], jax=r8["jax"], jax_triton=r8["jax_triton"], triton=r8["triton"],
    python=r8["python"], tokamax=r8.get("tokamax"), dates=dict(run8=r8["date"], run9=r9["date"]),
    timing=r8["timing"],
    official_same_run=dict(
        note=("official PyTorch/Triton kernel, float16, triton.testing.do_bench medians, on the "
              "run-8 machine, with TRITON_ALLOW_NON_CONSTEXPR_GLOBALS=1"),
        gpu=off["gpu"], torch=off["torch"], triton=off["triton"], rows=off["rows"]),
    gpu_check=dict(source="gpu_check_run7.json", cases=len(chk["cases"]),
                   all_passed=chk["all_passed"], date=chk["date"]),
    targets=dict(
        fwdbwd_2x_official_anchor_all=all(s["speedup_fwdbwd_vs_official_anchor"] >= 2
                                          for s in summary),
        fwdbwd_speedup_range=[round(min(s["speedup_fwdbwd_vs_official_anchor"] for s in summary), 2),
                              round(max(s["speedup_fwdbwd_vs_official_anchor"] for s in summary), 2)],
        fwd_9451_fraction_of_floor={s["pattern"]: round(s["fwd_fraction_of_tile_floor"], 3)
                                    for s in summary if s["L"] == 9451},
        no_failures=all(isinstance(s["ours_fwd_ms"], float) and isinstance(s["ours_fwdbwd_ms"], float)
                        for s in summary)),
    summary=summary,
    forward_groups_run10=dict(matmul_tflops_bf16=r10["matmul_tflops_bf16"], date=r10["date"],
                              rows=groups),
    previous_version=previous)
json.dump(out, open("bench/results/attention.json", "w"), indent=1)
for s in summary:
  print(s["L"], s["pattern"], "fwd %.4f fb %.4f | f16 %.4f %.4f | floor %.4f frac %.3f | x_off %.2f "
        "(run8 official fb %.3f) | cudnn %s/%s" % (
            s["ours_fwd_ms"], s["ours_fwdbwd_ms"], s["ours_float16_fwd_ms"],
            s["ours_float16_fwdbwd_ms"], s["tile_floor_fwd_ms"], s["fwd_fraction_of_tile_floor"],
            s["speedup_fwdbwd_vs_official_anchor"], s["official_fwdbwd_ms_run8"],
            s["cudnn_fwd_ms"], str(s["cudnn_fwdbwd_ms"])[:12]))
print(out["targets"])
for g in groups:
  print(g["L"], g["pattern"], "run10 fwd g1 %.4f g16 %.4f floor %.4f -> %.3f / %.3f" % (
      g["ungrouped_fwd_ms"], g["grouped16_fwd_ms"], g["tile_floor_fwd_ms"],
      g["ungrouped_fraction_of_tile_floor"], g["grouped16_fraction_of_tile_floor"]))
