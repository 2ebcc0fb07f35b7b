"""Plain XLA reference of quantize-and-pack: :func:`splitq_jax.quant.quantize` followed by
:func:`splitq_jax.packing.pack_quantized` (per-row statistics, no groups)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from splitq_jax import packing, quant


@functools.partial(jax.jit, static_argnames=("bits", "symmetric", "word_dtype"))
def quantize_pack_xla(
    x: jax.Array,
    bits: int,
    *,
    symmetric: bool = True,
    clip: dict[str, jax.Array] | None = None,
    word_dtype=jnp.uint32,
) -> packing.PackedTensor:
    """Per-row (per-token) integer quantization of ``x`` ``(..., d)``, packed along ``d``."""
    p = quant.quantize(x, bits, symmetric=symmetric, clip=clip)
    return packing.pack_quantized(p, bits, symmetric, x.shape, None, word_dtype)
