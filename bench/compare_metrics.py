"""Whether two runs' metrics.jsonl files hold the same steps and losses (a resumed run against one
that was never stopped): prints a table, writes a JSON summary.

  python bench/compare_metrics.py REFERENCE/metrics.jsonl RESUMED/metrics.jsonl --out summary.json
"""

from __future__ import annotations

import argparse
import json


def read_rows(path: str) -> dict[int, dict]:
  rows = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        if row["step"] in rows:
          raise SystemExit(f"{path}: step {row['step']} logged twice")
        rows[row["step"]] = row
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("reference")
  p.add_argument("resumed")
  p.add_argument("--keys", default="loss,grad_norm")
  p.add_argument("--out", default=None)
  a = p.parse_args()
  ref, res = read_rows(a.reference), read_rows(a.resumed)
  keys = a.keys.split(",")
  steps = sorted(set(ref) | set(res))
  table, worst = [], 0.0
  for s in steps:
    r, q = ref.get(s), res.get(s)
    row = {"step": s}
    for k in keys:
      row[k] = [None if r is None else r.get(k), None if q is None else q.get(k)]
      if r is not None and q is not None and k in r and k in q:
        worst = max(worst, abs(r[k] - q[k]) / max(abs(r[k]), 1e-12))
    table.append(row)
  summary = {
    "reference": a.reference,
    "resumed": a.resumed,
    "same_steps": sorted(ref) == sorted(res),
    "max_relative_difference": worst,
    "bit_equal": sorted(ref) == sorted(res) and worst == 0.0,
    "rows": table,
  }
  print(f"{'step':>6} " + " ".join(f"{k + ' ref':>14} {k + ' resumed':>14}" for k in keys))
  for row in table:
    print(f"{row['step']:>6} " + " ".join(f"{str(row[k][0])[:14]:>14} {str(row[k][1])[:14]:>14}" for k in keys))
  print(f"same steps: {summary['same_steps']}, max relative difference: {worst:.3g}")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main()
