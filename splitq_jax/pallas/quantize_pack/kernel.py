"""Pallas (Triton) kernel: per-row integer quantization of ``(rows, d)`` fused with bit packing.

Each program owns ``block_rows`` rows: it loads a ``(block_rows, next_pow2(d))`` tile, reduces the
row statistics, quantizes, and packs ``c`` consecutive values per word by reshaping the tile to
``(block_rows, words, c)`` and summing ``(q & (2^b - 1)) << (k * b)`` over the slot axis, exactly
the little-endian layout of :func:`splitq_jax.packing.pack`. (Strided per-slot loads would avoid
the reshape, but the Pallas interpreter does not implement strided loads.) Padding columns (past
``d``, up to the power-of-two tile) are masked out of the statistics and packed as zeros, like
``pack``'s zero padding; rows past the end are neither read nor written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from splitq_jax.pallas import _common as C
from splitq_jax.quant import check_bits

KERNEL_BITS = (2, 4, 8)  # power-of-two values per word (3-bit's 10-per-word is not a Triton tile)
WORD_DTYPES = {"uint8": jnp.uint8, "uint32": jnp.uint32}


def _quantize_pack_kernel(
    *refs,
    n_rows,
    n_cols,
    bits,
    symmetric,
    has_clip,
    precise_asm,
    per_word,
    word_dtype,
):
    if has_clip:
        x_ref, smax_ref, smin_ref, w_ref, s_ref, z_ref = refs
    else:
        x_ref, w_ref, s_ref, z_ref = refs
    block_rows, tile_cols = x_ref.shape
    n_word_tile = tile_cols // per_word
    n_words = -(-n_cols // per_word)
    rows = pl.program_id(0) * block_rows + jax.lax.broadcasted_iota(
        jnp.int32, (block_rows, 1), 0
    )
    row_ok = rows < n_rows
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, tile_cols), 1)
    valid = row_ok & (cols < n_cols)
    x = plgpu.load(x_ref, mask=valid, other=0).astype(jnp.float32)
    sig_max = sig_min = None
    if has_clip:
        sig_max = plgpu.load(smax_ref, mask=row_ok, other=1)
        sig_min = plgpu.load(smin_ref, mask=row_ok, other=1)
    rq = C.RowQuant(bits, symmetric, precise_asm)
    scale, zero = rq.row_params(x, valid, sig_max, sig_min)
    q = rq.quantize(x, scale, zero).astype(jnp.int32)
    q = jnp.where(valid, q, 0)  # pack() pads each row with zero values
    words = C.pack_slots(q, bits, per_word, jnp.uint32)
    word_idx = jax.lax.broadcasted_iota(jnp.int32, (1, n_word_tile), 1)
    plgpu.store(w_ref, words.astype(word_dtype), mask=row_ok & (word_idx < n_words))
    plgpu.store(s_ref, scale.astype(jnp.float32), mask=row_ok)
    plgpu.store(z_ref, zero.astype(jnp.int32), mask=row_ok)


@functools.partial(
    jax.jit,
    static_argnames=(
        "bits", "symmetric", "word_dtype", "block_rows", "interpret", "precise_div"
    ),
)
def quantize_pack_pallas(
    x: jax.Array,
    sig_max: jax.Array | None,
    sig_min: jax.Array | None,
    *,
    bits: int,
    symmetric: bool,
    word_dtype: str = "uint32",
    block_rows: int | None = None,
    interpret: bool = False,
    precise_div: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Quantize each row of ``x`` ``(rows, d)`` and pack it into words.

    Args:
      x: ``(rows, d)`` float32 / bfloat16 / float16.
      sig_max, sig_min: ``(rows, 1)`` sigmoid of the clipping logits, or both None.
      bits: 2, 4 or 8. symmetric: signed two's-complement values (z = 0) or unsigned with a zero
        point.
      word_dtype: ``"uint32"`` or ``"uint8"``.
      block_rows: rows per program (power of two); default from the tile size.
      interpret: run with the Pallas interpreter (CPU).
      precise_div: IEEE float32 division via PTX ``div.rn.f32``; default ``not interpret``.
    Returns:
      ``(words, scale, zero)``: ``(rows, ceil(d / c))`` words, ``(rows, 1)`` float32 scales and
      ``(rows, 1)`` int32 zero points (all zero when symmetric).
    """
    check_bits(bits)
    if bits not in KERNEL_BITS:
        raise ValueError(f"quantize_pack kernel supports bits {KERNEL_BITS}, got {bits}")
    if word_dtype not in WORD_DTYPES:
        raise ValueError(f"word_dtype must be one of {tuple(WORD_DTYPES)}, got {word_dtype!r}")
    C.check_input(x, "quantize_pack_pallas")
    if (sig_max is None) != (sig_min is None):
        raise ValueError("pass both clipping factors or neither")
    wdt = WORD_DTYPES[word_dtype]
    per_word = jnp.dtype(wdt).itemsize * 8 // bits
    n_rows, n_cols = x.shape
    n_words = -(-n_cols // per_word)
    tile_cols = max(C.next_pow2(n_cols), per_word)
    n_word_tile = tile_cols // per_word
    if block_rows is None:
        block_rows = C.default_block_rows(n_rows, tile_cols)
    block_rows = C.check_block_rows(block_rows)
    if precise_div is None:
        precise_div = not interpret
    has_clip = sig_max is not None
    row_spec = pl.BlockSpec((block_rows, 1), lambda i: (i, 0))
    args, in_specs = C.row_tiled_inputs(x, sig_max, sig_min, n_rows=n_rows, block_rows=block_rows,
                                        tile_cols=tile_cols)
    kernel = functools.partial(
        _quantize_pack_kernel,
        n_rows=n_rows,
        n_cols=n_cols,
        bits=bits,
        symmetric=symmetric,
        has_clip=has_clip,
        precise_asm=precise_div,
        per_word=per_word,
        word_dtype=wdt,
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((n_rows, n_words), wdt),
            jax.ShapeDtypeStruct((n_rows, 1), jnp.float32),
            jax.ShapeDtypeStruct((n_rows, 1), jnp.int32),
        ),
        grid=(pl.cdiv(n_rows, block_rows),),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((block_rows, n_word_tile), lambda i: (i, 0)),
            row_spec,
            row_spec,
        ),
        interpret=interpret,
        compiler_params=C.compiler_params(block_rows * tile_cols),
        name=f"quantize_pack_w{bits}_{'sym' if symmetric else 'asym'}_{word_dtype}",
    )(*args)
