"""Benchmark: ``python -m splitq_jax.pallas.split_gemm.benchmark [--quick]``.

Times every implementation of the split GEMM (main W4 path + CWS, MAC, text and vision terms +
bias, W4A4 operands already quantized) at the Qwen2.5-VL-7B linear shapes for decode-like and
prefill-like token counts, and reports the effective int8-op throughput of the main product.
Meaningful on a GPU only; on CPU ``--quick`` runs one tiny shape in the interpreter. The
end-to-end comparison with bf16 and W4A16 linears is ``bench/kernels.py``.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import packing
from splitq_jax.pallas.split_gemm import QuantizedActs, gemm_weight, split_gemm
from splitq_jax.pallas.testing import time_fn


def _weight(rng, n, k):
    q = rng.integers(-8, 8, (n, k), dtype=np.int32)
    t = packing.PackedTensor(
        packing.pack(jnp.asarray(q), 4, jnp.uint8, signed=True),
        jnp.asarray(rng.uniform(0.001, 0.02, n), jnp.float32), None, 4, (n, k), True, None,
        "uint8",
    )
    return gemm_weight(t)


def _acts(rng, m, k):
    return QuantizedActs(
        jnp.asarray(rng.integers(-8, 8, (m, k)), jnp.int8),
        jnp.asarray(rng.uniform(0.01, 0.1, m), jnp.float32),
        None,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small shape (CPU smoke test)")
    args = ap.parse_args(argv)
    shapes = [(7, 256, 128)] if args.quick else [
        (m, k, n) for k, n in ((3584, 18944), (18944, 3584), (3584, 3584))
        for m in (1, 16, 256, 2048, 8192)
    ]
    print(f"backend={jax.default_backend()}")
    print(f"{'M':>6} {'K':>6} {'N':>6} {'impl':>7} {'us':>10} {'TOPS':>8}")
    rng = np.random.default_rng(0)
    for m, k, n in shapes:
        r_cws, r_mac, k_out = (math.ceil(f * min(k, n)) for f in (0.02, 0.03, 0.02))
        x, w = _acts(rng, m, k), _weight(rng, n, k)
        terms = {name: (_acts(rng, m, kk), _weight(rng, n, kk))
                 for name, kk in (("cws", r_cws), ("mac", r_mac), ("text", k_out),
                                  ("vision", k_out))}
        mask = jnp.asarray(rng.random(m) < 0.5)
        bias = jnp.zeros((n,), jnp.float32)
        for impl in ("xla", "pallas"):
            f = jax.jit(lambda x_, t_, impl=impl: split_gemm(
                x_, w, **t_, text_mask=mask, bias=bias, implementation=impl))
            us = time_fn(f, x, terms, iters=3 if args.quick else 50)
            print(f"{m:>6} {k:>6} {n:>6} {impl:>7} {us:>10.1f} {2 * m * k * n / us / 1e6:>8.1f}")


if __name__ == "__main__":
    main()
