"""Benchmark: ``python -m splitq_jax.pallas.quantize_pack.benchmark [--quick]``.

Times every implementation of per-token quantize-and-pack on the real hidden sizes for
decode-like and prefill-like token counts; bandwidth counts the float read and the packed write.
Meaningful on a GPU only; on CPU ``--quick`` runs one tiny shape in the interpreter.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from splitq_jax import packing
from splitq_jax.pallas.quantize_pack import quantize_pack
from splitq_jax.pallas.testing import random_rows, time_fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small shape (CPU smoke test)")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    shapes = [(7, 896)] if args.quick else [
        (m, d) for d in (2048, 3584, 4096, 5120) for m in (1, 16, 512, 4096)
    ]
    print(f"backend={jax.default_backend()} dtype={dtype.name}")
    print(f"{'M':>6} {'d':>6} {'bits':>4} {'impl':>7} {'sym':>5} {'us':>10} {'GB/s':>8}")
    for m, d in shapes:
        x, _ = random_rows((m,), d, dtype=dtype)
        for bits in (4, 8):
            for symmetric in (True, False):
                for impl in ("xla", "pallas"):
                    f = jax.jit(
                        lambda x_, impl=impl, b=bits, s=symmetric: quantize_pack(
                            x_, b, symmetric=s, implementation=impl
                        )
                    )
                    us = time_fn(f, x, iters=3 if args.quick else 50)
                    words = m * packing.packed_length(d, bits, "uint32")
                    moved = x.size * dtype.itemsize + 4 * words
                    print(
                        f"{m:>6} {d:>6} {bits:>4} {impl:>7} {symmetric!s:>5} {us:>10.1f} "
                        f"{moved / us / 1e3:>8.1f}"
                    )


if __name__ == "__main__":
    main()
