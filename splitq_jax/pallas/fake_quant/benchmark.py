"""Benchmark: ``python -m splitq_jax.pallas.fake_quant.benchmark [--quick]``.

Times every implementation on the real hidden sizes (d = 2048, 3584, 4096, 5120) for decode-like
and prefill-like row counts and reports the effective memory bandwidth (one read, one write).
Meaningful on a GPU only; on CPU the Pallas kernel runs in the (slow) interpreter, so ``--quick``
runs one tiny shape as a smoke test.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from splitq_jax.pallas.fake_quant import fake_quant
from splitq_jax.pallas.testing import random_clip, random_rows, time_fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small shape (CPU smoke test)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    shapes = [(7, 896)] if args.quick else [
        (m, d) for d in (2048, 3584, 4096, 5120) for m in (1, 16, 512, 4096)
    ]
    print(f"backend={jax.default_backend()} bits={args.bits} dtype={dtype.name}")
    print(f"{'M':>6} {'d':>6} {'impl':>7} {'sym':>5} {'us':>10} {'GB/s':>8}")
    for m, d in shapes:
        x, rng = random_rows((m,), d, dtype=dtype)
        clip = random_clip("row", (m,), rng)
        for symmetric in (True, False):
            for impl in ("xla", "pallas"):
                f = jax.jit(
                    lambda x_, c_, impl=impl, s=symmetric: fake_quant(
                        x_, args.bits, symmetric=s, clip=c_, implementation=impl
                    )
                )
                us = time_fn(f, x, clip, iters=3 if args.quick else 50)
                gbs = 2 * x.size * dtype.itemsize / us / 1e3
                print(f"{m:>6} {d:>6} {impl:>7} {symmetric!s:>5} {us:>10.1f} {gbs:>8.1f}")


if __name__ == "__main__":
    main()
