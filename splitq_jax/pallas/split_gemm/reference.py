"""Plain XLA reference of the split GEMM: the kernel's integer dots and epilogue, in ``jnp``.

Per term ``t`` (main, then cws, mac, text, vision, as :func:`splitq_jax.quantized.group.apply_group`
adds them)::

    acc_t = q_x . q_w^T  (int8 x int8 -> int32)  -  z_x * row_sum_w      (zero point: if any)
            (packed activations, ``lane_bits=4``: their lanes unpacked to int8 first)
    y_t   = (float32(acc_t) * s_x) * s_w                                  (mac: text tokens only)
    y     = ((((y_main + y_cws) + y_mac) + y_text) + y_vision) + bias

The same operations in the same order as the kernel's epilogue, so the integer accumulators agree
bit for bit and the float output to rounding (exactly, where no operations get fused).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from splitq_jax import packing
from splitq_jax.pallas.split_gemm.operands import TERMS, GemmWeight, QuantizedActs


def term_accumulator(x: QuantizedActs, w: GemmWeight) -> jax.Array:
    """``sum_k (q_x - z_x) q_w`` as int32, ``(..., N)``."""
    q_w = packing.unpack(w.qvalue, w.bits, w.k, w.word_dtype, signed=True).astype(jnp.int8)
    q_x = x.values()  # int8 (..., K): packed 4-bit lanes unpacked to the same integers
    acc = jax.lax.dot_general(
        q_x, q_w, (((q_x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.int32
    )
    if x.zero_point is not None:
        acc = acc - x.zero_point[..., None] * w.row_sum
    return acc


def dequantize_accumulator(acc: jax.Array, x_scale: jax.Array, w_scale: jax.Array) -> jax.Array:
    """The epilogue of one term: ``(float32(acc) * s_x) * s_w``."""
    return acc.astype(jnp.float32) * x_scale[..., None] * w_scale


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def split_gemm_xla(
    x: QuantizedActs,
    w: GemmWeight,
    *,
    cws: tuple[QuantizedActs, GemmWeight] | None = None,
    mac: tuple[QuantizedActs, GemmWeight] | None = None,
    text: tuple[QuantizedActs, GemmWeight] | None = None,
    vision: tuple[QuantizedActs, GemmWeight] | None = None,
    text_mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype=jnp.float32,
) -> jax.Array:
    """``(..., N)`` output of the split linear from its quantized operands (see the module doc)."""
    terms = dict(zip(TERMS, (cws, mac, text, vision)))
    y = dequantize_accumulator(term_accumulator(x, w), x.scale, w.scale)
    for name in TERMS:
        if terms[name] is None:
            continue
        a, b = terms[name]
        t = dequantize_accumulator(term_accumulator(a, b), a.scale, b.scale)
        if name == "mac":
            t = jnp.where(text_mask[..., None], t, 0.0)
        y = y + t
    if bias is not None:
        y = y + jnp.asarray(bias, jnp.float32)
    return y.astype(out_dtype)
