"""Public quantize-and-pack op: ``implementation=None | "xla" | "pallas"`` (inference only)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import packing
from splitq_jax.pallas import _common as C
from splitq_jax.pallas.quantize_pack.kernel import KERNEL_BITS, quantize_pack_pallas
from splitq_jax.pallas.quantize_pack.reference import quantize_pack_xla
from splitq_jax.quant import check_bits


@functools.partial(
    jax.jit, static_argnames=("bits", "symmetric", "word_dtype", "block_rows", "interpret")
)
def _quantize_pack_pallas_jit(x, clip, *, bits, symmetric, word_dtype, block_rows, interpret):
    rows = x.shape[:-1]
    sig_max, sig_min = C.clip_factors(clip, rows)
    words, scale, zero = quantize_pack_pallas(
        x.reshape(-1, x.shape[-1]),
        sig_max,
        sig_min,
        bits=bits,
        symmetric=symmetric,
        word_dtype=word_dtype,
        block_rows=block_rows,
        interpret=interpret,
    )
    return packing.PackedTensor(
        qvalue=words.reshape(*rows, words.shape[-1]),
        scale=scale.reshape(rows),
        zero_point=None if symmetric else zero.reshape(rows).astype(jnp.uint8),
        bits=bits,
        shape=tuple(int(s) for s in x.shape),
        symmetric=symmetric,
        group_size=None,
        word_dtype=word_dtype,
    )


def quantize_pack(
    x: jax.Array,
    bits: int,
    *,
    symmetric: bool = True,
    clip: dict[str, jax.Array] | None = None,
    word_dtype=jnp.uint32,
    implementation: str | None = None,
    block_rows: int | None = None,
    interpret: bool | None = None,
) -> packing.PackedTensor:
    """Per-token quantization of activations ``x`` ``(..., d)`` into a packed tensor.

    Equal (bit for bit) to ``pack_quantized(quantize(x, bits, symmetric=, clip=), bits, symmetric,
    x.shape, None, word_dtype)``: ``qvalue`` holds ``c = word_bits // bits`` values per word
    (signed two's complement when symmetric, unsigned otherwise), ``scale`` is float32 of shape
    ``x.shape[:-1]``, ``zero_point`` is uint8 (asymmetric) or None.

    Args:
      x: ``(..., d)`` float32 / bfloat16 / float16.
      bits: 2..8; the kernel packs 2, 4 and 8 bits (others run the XLA reference).
      symmetric, clip: as in :func:`splitq_jax.quant.quantize` (per-row or scalar logits).
      word_dtype: ``jnp.uint32`` (default) or ``jnp.uint8``.
      implementation: ``"pallas"``, ``"xla"`` or None (Pallas on GPU, XLA elsewhere).
      block_rows: rows per kernel program (power of two), None for the default.
      interpret: Pallas interpreter; default on when not running on a GPU.
    """
    check_bits(bits)
    impl = C.resolve_implementation(implementation)
    wdt = np.dtype(word_dtype)
    if impl == "xla" or bits not in KERNEL_BITS or x.size == 0:
        return quantize_pack_xla(x, bits, symmetric=symmetric, clip=clip, word_dtype=wdt)
    if wdt.name not in ("uint8", "uint32"):
        raise ValueError(f"unsupported word dtype {word_dtype!r}: use uint8 or uint32")
    if x.ndim == 0:
        raise ValueError("quantize_pack() needs at least one axis")
    return _quantize_pack_pallas_jit(
        x,
        clip,
        bits=bits,
        symmetric=bool(symmetric),
        word_dtype=wdt.name,
        block_rows=None if block_rows is None else C.check_block_rows(block_rows),
        interpret=C.resolve_interpret(interpret),
    )
