"""Plain XLA reference of the fake-quant op: :func:`splitq_jax.quant.fake_quant` itself."""

from __future__ import annotations

import functools

import jax

from splitq_jax import quant


@functools.partial(jax.jit, static_argnames=("bits", "symmetric", "group_size"))
def fake_quant_xla(
    x: jax.Array,
    bits: int | None,
    *,
    symmetric: bool = True,
    clip: dict[str, jax.Array] | None = None,
    group_size: int | None = None,
) -> jax.Array:
    """Quantize-dequantize along the last axis (STE); see :func:`splitq_jax.quant.fake_quant`.

    Jitted, as model code runs it (the quantizer's arithmetic is defined without divisions that
    XLA could rewrite, so eager execution gives the same bits).
    """
    return quant.fake_quant(x, bits, symmetric=symmetric, clip=clip, group_size=group_size)
