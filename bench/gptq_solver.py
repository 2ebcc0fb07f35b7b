"""Cost of the Hessian column solvers (GPTQ, GPTAQ) on one linear: time to solve and time to compile.

    python bench/gptq_solver.py [--repeats 3] [--compile-widths 256,4864,18944]

Part ``solve``: the 0.5B models' MLP linears, ``gate_proj`` / ``up_proj`` (4864 x 896: 896 input
columns) and ``down_proj`` (896 x 4864: 4864 input columns), at W4 per row and W3 in groups of 128,
with a Hessian of 8192 random correlated tokens: the whole solve (Cholesky, inverse, column loop;
GPTAQ also its ``P``), first call (compiles) and the median of ``--repeats`` calls after it; the
plain round-to-nearest of the same weight (``quant.fake_quant``) is timed in the same run, and the
ratio is what compares across machines.

Part ``compile``: the column loop alone, lowered and compiled from shapes (no data) at each of
``--compile-widths`` input columns with Qwen2.5-VL-7B's ``down_proj`` rows (3584): the loop is an
XLA loop, so compile time must not grow with the width (width 18944 is the 7B model's down_proj).

Writes ``bench/results/gptq_solver-<machine>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench._common import RESULTS, machine_name, run_record, write_json_atomic  # noqa: E402
from splitq_jax.methods.gptq import solver  # noqa: E402
from splitq_jax.quant import fake_quant  # noqa: E402

BENCH = "gptq_solver"
LINEARS = {"gate_proj (4864x896)": (4864, 896), "down_proj (896x4864)": (896, 4864)}
SETTINGS = {"w4 per row": dict(bits=4, group_size=None), "w3 g128": dict(bits=3, group_size=128)}


def statistics_of(o: int, d: int, tokens: int, seed: int = 0):
    """A weight ``(o, d)`` and the Hessian / cross term ``(d, d)`` of ``tokens`` correlated inputs."""
    rng = np.random.default_rng(seed)
    w = rng.normal(scale=0.02, size=(o, d)).astype(np.float32)
    x = (rng.normal(size=(tokens, d)) + rng.normal(size=(tokens, 1))).astype(np.float32)
    x *= rng.uniform(0.2, 3.0, size=d).astype(np.float32)
    x_fp = x + 0.05 * rng.normal(size=x.shape).astype(np.float32)
    return jnp.asarray(w), jnp.asarray(x.T @ x), jnp.asarray((x_fp - x).T @ x)


def timed(fn, repeats: int) -> tuple[float, float]:
    """``(first call seconds, median of the next ``repeats``)``, each to a finished result."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    rest = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        rest.append(time.perf_counter() - t0)
    return first, statistics.median(rest)


def compile_seconds(o: int, d: int, asymmetric: bool) -> float:
    """Lower and compile the column loop for an ``(o, d)`` weight from shapes only."""
    f32 = jnp.float32
    w, m = jax.ShapeDtypeStruct((o, d), f32), jax.ShapeDtypeStruct((d, d), f32)
    grid = solver.Grid(jax.ShapeDtypeStruct((o, 1), f32), jax.ShapeDtypeStruct((o, 1), f32))
    args = (w, m, m, jax.ShapeDtypeStruct((d,), f32), grid, jax.ShapeDtypeStruct((d,), jnp.int32), None)
    t0 = time.perf_counter()
    solver._column_loop.lower(*args, bits=4, symmetric=True, block=128, dynamic=False, clip_search=False,
                              outer_quantized=True, asymmetric=asymmetric).compile()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--compile-widths", default="256,4864,18944")
    ap.add_argument("--compile-rows", type=int, default=3584)
    args = ap.parse_args(argv)
    machine = machine_name()
    base = {"bench": BENCH, "machine": machine}
    records = []
    for lin, (o, d) in LINEARS.items():
        w, h, dc = statistics_of(o, d, args.tokens)
        for setting, kw in SETTINGS.items():
            rtn_first, rtn = timed(lambda: fake_quant(w, kw["bits"], group_size=kw["group_size"]), args.repeats)
            for method, extra in (("gptq", {}), ("gptaq", {"d_cross": dc})):
                first, med = timed(lambda: solver.solve(w, h, **kw, **extra).codes, args.repeats)
                row = {**base, "part": "solve", "linear": lin, "method": method, "bits": setting, "tokens": args.tokens}
                records += [{**row, "metric": "solve_seconds", "value": med, "repeats": args.repeats},
                            {**row, "metric": "first_call_seconds", "value": first},
                            {**row, "metric": "rtn_seconds", "value": rtn},
                            {**row, "metric": "solve_over_rtn", "value": med / rtn}]
                print(f"{lin} {setting} {method}: {med:.2f} s ({first:.2f} s first call; rtn {rtn * 1e3:.1f} ms)",
                      flush=True)
    for d in (int(v) for v in args.compile_widths.split(",")):
        for method, asym in (("gptq", False), ("gptaq", True)):
            s = compile_seconds(args.compile_rows, d, asym)
            records.append({**base, "part": "compile", "method": method, "rows": args.compile_rows, "width": d,
                            "metric": "column_loop_compile_seconds", "value": s})
            print(f"column loop ({method}) at width {d}: compiled in {s:.2f} s", flush=True)
    records.append(run_record(BENCH, machine, repeats=args.repeats, tokens=args.tokens))
    out = RESULTS / f"{BENCH}-{machine}.json"
    write_json_atomic(out, records)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
