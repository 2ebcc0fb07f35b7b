"""Markdown tables from a benchmark's JSON records (for docs/results.md and closing notes).

    python bench/tables.py bench/results/real_weights-cpu-2core.json --part llm --metrics ppl,kl,top1_agreement

Rows are methods, columns bit widths; one table per metric. Missing cells print as ``-``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ORDER = ("fp", "rtn", "smoothquant", "gptq", "gptaq", "vlm-ptq", "flatquant", "flatquant+gptq", "flatquant+mocd",
         "flatquant+mocd+cws", "splitq", "splitq+gptq")
# fp32: the full-precision reference row; weight-only settings first
BITS = ("fp32", "w4a16", "w3a16", "w2a16", "w4a8", "w4a4", "w3a3", "w3a2")


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def table(records: list[dict], metric: str, **where) -> str:
    rows = [r for r in records if r.get("metric") == metric and all(r.get(k) == v for k, v in where.items())]
    methods = sorted({r["method"] for r in rows}, key=lambda m: (ORDER.index(m) if m in ORDER else 99, m))
    bits = [b for b in BITS if any(r["bits"] == b for r in rows)]
    cell = {(r["method"], r["bits"]): r["value"] for r in rows}
    out = [f"| {metric} | " + " | ".join(bits) + " |", "|---|" + "---|" * len(bits)]
    for m in methods:
        out.append(f"| {m} | " + " | ".join(fmt(cell[m, b]) if (m, b) in cell else "-" for b in bits) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--metrics", default="ppl,kl,top1_agreement")
    ap.add_argument("--part", default=None, help="keep records of this part only")
    args = ap.parse_args(argv)
    records = json.loads(Path(args.json).read_text())
    where = {"part": args.part} if args.part else {}
    for metric in args.metrics.split(","):
        print(table(records, metric, **where))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
