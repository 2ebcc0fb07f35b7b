"""Cost of the quantized split linear on a GPU, against bf16 and a W4A16 baseline.

At the Qwen2.5-VL-7B language-model shapes (``gate/up``: 3584 -> 18944, ``down``: 18944 -> 3584,
``o_proj``: 3584 -> 3584) and token counts M in {1, 16, 256, 2048, 8192}, per shape, side by side
in one process (median of ``--iters`` after a warm-up, all jitted):

* ``bf16``: ``jnp.dot`` of bf16 activations and a bf16 weight (the unquantized linear);
* ``w4a16``: dequantize packed int4 weights (per-channel scales) to bf16, then ``jnp.dot``
  (weight-only quantization, the usual baseline; XLA fuses what it can);
* ``split_gemm``: the packed split GEMM alone on already-quantized operands (main path + CWS, MAC,
  text and vision terms + bias, one kernel);
* ``w4a4_linear``: the whole quantized linear from bf16 activations: per-token quantization of
  the main, outlier and rank-r branch activations (the branch down-projections ``x_hat L_in`` as
  bf16 dots; XLA ops, a stand-in for the activation kernel) + ``split_gemm``. The online Kronecker
  transform of the main path is not included.
* ``act_pack``: the activation stage alone as inference runs it
  (:func:`splitq_jax.pallas.act_pack.act_pack`, one kernel): masked main path, online Kronecker
  transform (``kron_factors`` of ``d_in``), per-token quantization, both outlier groups with their
  dense transforms, CWS and MAC down-projections (packed int4 ``L_in``) and their re-quantization;
* ``act_pack_linear``: the whole quantized linear of the runtime
  (``qlinear.quantized_group_apply``'s kernel path): ``act_pack`` + ``split_gemm``.

Auxiliary sizes are the paper's ratios at these shapes: 2% text and 2% vision outlier channels,
CWS rank 2% and MAC rank 3% of ``min(d_in, d_out)``; W4A4, symmetric.

Writes ``bench/results/kernels-<machine>.json``: flat records (``bench``, ``shape``, ``m``, ``k``,
``n``, ``impl``, ``metric`` = ``time_us``, ``value``) and ratios (``metric`` =
``speedup_vs_bf16`` / ``speedup_vs_w4a16`` of ``w4a4_linear`` and ``split_gemm``), plus one
``metric == "run"`` record with the command and versions.

On a machine without a GPU the Pallas kernel only runs in the interpreter, so the benchmark
refuses unless ``--smoke`` (two tiny shapes, printed, no JSON unless ``--out``).

``--tiles 64x128 128x64 ...`` also times the split GEMM with other output tiles (records carry
``tile``; the default comes from ``split_gemm.kernel.default_blocks``).

Run from the repository root: ``python bench/kernels.py [--m 1 16 256 --iters 50]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (adds the repo root to sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from splitq_jax import packing  # noqa: E402
from splitq_jax import transforms as tf  # noqa: E402
from splitq_jax.pallas.act_pack import OutlierGroup, act_pack  # noqa: E402
from splitq_jax.pallas.split_gemm import gemm_weight, quantize_acts, split_gemm  # noqa: E402
from splitq_jax.pallas.split_gemm.kernel import default_blocks  # noqa: E402
from splitq_jax.pallas.testing import time_fn  # noqa: E402

BENCH = "kernels"
SHAPES = {  # name: (d_in, d_out), Qwen2.5-VL-7B language model
    "gate_up_3584x18944": (3584, 18944),
    "down_18944x3584": (18944, 3584),
    "o_proj_3584x3584": (3584, 3584),
}
SMOKE_SHAPES = {"smoke_256x128": (256, 128)}
TOKENS = (1, 16, 256, 2048, 8192)


def _packed(rng, n, k, bits=4):
    q = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=np.int32)
    scale = rng.uniform(0.001, 0.02, n).astype(np.float32)
    words = packing.pack(jnp.asarray(q), bits, jnp.uint8, signed=True)
    return packing.PackedTensor(words, jnp.asarray(scale), None, bits, (n, k), True, None, "uint8")


def build(k: int, n: int, seed: int = 0):
    """Random weights of one split linear (main + CWS + MAC + text + vision), packed."""
    rng = np.random.default_rng(seed)
    k_t = k_v = max(1, round(0.02 * k))
    r_cws = math.ceil(0.02 * min(k, n))
    r_mac = math.ceil(0.03 * min(k, n))
    perm = rng.permutation(k)
    w = {
        "main": _packed(rng, n, k),
        "text": _packed(rng, n, k_t),
        "vision": _packed(rng, n, k_v),
        "cws": _packed(rng, n, r_cws),
        "mac": _packed(rng, n, r_mac),
    }
    return {
        "gemm": {name: gemm_weight(t) for name, t in w.items()},
        "packed_main": w["main"],
        "l_in": {  # branch down-projections (r, K), bf16 (they run in the activation stage)
            "cws": jnp.asarray(rng.normal(0, 0.02, (r_cws, k)), jnp.bfloat16),
            "mac": jnp.asarray(rng.normal(0, 0.02, (r_mac, k)), jnp.bfloat16),
        },
        "p": {g: jnp.asarray(np.eye(kk) + rng.normal(0, 0.01, (kk, kk)), jnp.bfloat16)
              for g, kk in (("text", k_t), ("vision", k_v))},
        "idx": {"text": jnp.asarray(np.sort(perm[:k_t])),
                "vision": jnp.asarray(np.sort(perm[k_t:k_t + k_v]))},
        "main_mask": jnp.asarray(np.isin(np.arange(k), perm[:k_t + k_v], invert=True),
                                 jnp.bfloat16),
        "l_in_packed": {"cws": gemm_weight(_packed(rng, r_cws, k)),
                        "mac": gemm_weight(_packed(rng, r_mac, k))},
        "kron": {"p1": tf.random_orthogonal(jax.random.PRNGKey(seed), tf.kron_factors(k)[0]),
                 "p2": tf.random_orthogonal(jax.random.PRNGKey(seed + 1), tf.kron_factors(k)[1])},
        "w_bf16": jnp.asarray(rng.normal(0, 0.02, (n, k)), jnp.bfloat16),
        "bias": jnp.asarray(rng.normal(0, 0.1, n), jnp.float32),
    }


def make_fns(wts, interpret: bool | None):
    g = wts["gemm"]

    def quantize_all(x, text_mask):
        xm = x * wts["main_mask"]
        xq = quantize_acts(xm.astype(jnp.float32), 4)
        x_hat = (xq.qvalue.astype(jnp.float32) * xq.scale[:, None]).astype(jnp.bfloat16)
        terms = {}
        for branch in ("cws", "mac"):
            h = jnp.dot(x_hat, wts["l_in"][branch].T).astype(jnp.float32)
            terms[branch] = (quantize_acts(h, 4), g[branch])
        for grp in ("text", "vision"):
            xg = jnp.dot(jnp.take(x, wts["idx"][grp], axis=1), wts["p"][grp])
            terms[grp] = (quantize_acts(xg.astype(jnp.float32), 4), g[grp])
        return xq, terms

    def gemm(xq, terms, text_mask, block_m=None, block_n=None):
        return split_gemm(xq, g["main"], **terms, text_mask=text_mask, bias=wts["bias"],
                          out_dtype=jnp.bfloat16, interpret=interpret, block_m=block_m,
                          block_n=block_n)

    def w4a4_linear(x, text_mask):
        xq, terms = quantize_all(x, text_mask)
        return gemm(xq, terms, text_mask)

    def pack_acts(x, text_mask):
        outl = {grp: OutlierGroup(wts["idx"][grp], {"p": wts["p"][grp]}, None)
                for grp in ("text", "vision")}
        return act_pack(x, main_bits=4, aux_bits=4, symmetric=True, main_path="masked",
                        main_mask=wts["main_mask"], transform=wts["kron"], outliers=outl,
                        branches=wts["l_in_packed"], interpret=interpret, packed=True)  # as the runtime

    def act_pack_linear(x, text_mask):
        p = pack_acts(x, text_mask)
        terms = {b: (p.branches[b], g[b]) for b in ("cws", "mac")}
        terms.update({grp: (p.outliers[grp], g[grp]) for grp in ("text", "vision")})
        return split_gemm(p.main, g["main"], **terms, text_mask=text_mask, bias=wts["bias"],
                          out_dtype=jnp.bfloat16, interpret=interpret)

    def bf16(x, text_mask):
        return jnp.dot(x, wts["w_bf16"].T)

    main = wts["packed_main"]

    def w4a16(x, text_mask):
        q = packing.unpack(main.qvalue, 4, main.shape[1], "uint8", signed=True)
        w = (q.astype(jnp.bfloat16) * main.scale[:, None].astype(jnp.bfloat16))
        return jnp.dot(x, w.T)

    return {
        "bf16": jax.jit(bf16),
        "w4a16": jax.jit(w4a16),
        "w4a4_linear": jax.jit(w4a4_linear),
        "act_pack": jax.jit(pack_acts),
        "act_pack_linear": jax.jit(act_pack_linear),
        "split_gemm": jax.jit(gemm, static_argnames=("block_m", "block_n")),
        "_quantize": jax.jit(quantize_all),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=list(TOKENS), help="token counts")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--tiles", nargs="*", default=[], metavar="BMxBN",
                    help="also time split_gemm with these (block_m x block_n) tiles, e.g. 64x128")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: interpreter)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results folder)")
    args = ap.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.smoke:
        print(f"bench/kernels.py times a GPU kernel; backend is {jax.default_backend()!r}. "
              "Run it on a GPU, or pass --smoke for a tiny interpreted check.")
        return 0
    machine = C.machine_name()
    shapes = SMOKE_SHAPES if args.smoke else {s: SHAPES[s] for s in args.shapes}
    tokens = (1, 16) if args.smoke else tuple(args.m)
    iters = 2 if args.smoke else args.iters
    records = [C.run_record(BENCH, machine, shapes=shapes, tokens=tokens, iters=iters,
                            smoke=args.smoke)]
    print(f"machine={machine} backend={jax.default_backend()}")
    print(f"{'shape':>20} {'M':>5} {'bf16':>9} {'w4a16':>9} {'gemm':>9} {'w4a4':>9} "
          f"{'x bf16':>7} {'x w4a16':>7}  (us; x: speedup of the w4a4 linear)")
    for shape, (k, n) in shapes.items():
        wts = build(k, n)
        fns = make_fns(wts, None if on_gpu else True)
        rng = np.random.default_rng(1)
        for m in tokens:
            x = jnp.asarray(rng.standard_t(4, (m, k)), jnp.bfloat16)
            tmask = jnp.asarray(rng.random(m) < 0.5)
            xq, terms = fns["_quantize"](x, tmask)
            t = {
                "bf16": time_fn(fns["bf16"], x, tmask, iters=iters),
                "w4a16": time_fn(fns["w4a16"], x, tmask, iters=iters),
                "split_gemm": time_fn(fns["split_gemm"], xq, terms, tmask, iters=iters),
                "w4a4_linear": time_fn(fns["w4a4_linear"], x, tmask, iters=iters),
                "act_pack": time_fn(fns["act_pack"], x, tmask, iters=iters),
                "act_pack_linear": time_fn(fns["act_pack_linear"], x, tmask, iters=iters),
            }
            base = dict(bench=BENCH, machine=machine, shape=shape, m=m, k=k, n=n)
            tile = list(default_blocks(m, n))
            for impl, us in t.items():
                records.append({**base, "impl": impl, "metric": "time_us", "value": us,
                                "tile": tile if impl in ("split_gemm", "w4a4_linear",
                                                         "act_pack_linear") else None})
            for tile in args.tiles:
                bm, bn = (int(v) for v in tile.lower().split("x"))
                us = time_fn(lambda *a: fns["split_gemm"](*a, block_m=bm, block_n=bn), xq, terms,
                             tmask, iters=iters)
                records.append({**base, "impl": "split_gemm", "metric": "time_us", "value": us,
                                "tile": [bm, bn]})
                print(f"{'':>20} {m:>5} split_gemm tile {bm}x{bn}: {us:.1f} us")
            for impl in ("w4a4_linear", "act_pack_linear", "split_gemm"):
                for ref in ("bf16", "w4a16"):
                    records.append({**base, "impl": impl, "metric": f"speedup_vs_{ref}",
                                    "value": t[ref] / t[impl]})
            print(f"{'':>20} {m:>5} act_pack {t['act_pack']:.1f} us, act_pack + split_gemm "
                  f"{t['act_pack_linear']:.1f} us")
            print(f"{shape:>20} {m:>5} {t['bf16']:>9.1f} {t['w4a16']:>9.1f} "
                  f"{t['split_gemm']:>9.1f} {t['w4a4_linear']:>9.1f} "
                  f"{t['bf16'] / t['w4a4_linear']:>7.2f} {t['w4a16'] / t['w4a4_linear']:>7.2f}")
    out = args.out
    if out is None and not args.smoke:
        out = C.RESULTS / f"{BENCH}-{machine}.json"
    if out is not None:
        C.write_json_atomic(out, records)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
