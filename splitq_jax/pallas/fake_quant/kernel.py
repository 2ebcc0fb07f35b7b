"""Pallas (Triton) kernel: per-row fake quantization of a ``(rows, d)`` matrix.

Grid over row blocks; each program loads a ``(block_rows, next_pow2(d))`` tile with masked loads
(padding columns and rows past the end are ignored), reduces each row to max/min, derives scale
and zero point exactly as :mod:`splitq_jax.quant` does, rounds (ties to even), clamps,
dequantizes and stores with the same mask. Forward only: gradients are attached in ``api.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from splitq_jax.pallas import _common as C


def _fake_quant_kernel(
    *refs, n_rows, n_cols, bits, symmetric, has_clip, precise_asm
):
    if has_clip:
        x_ref, smax_ref, smin_ref, o_ref = refs
    else:
        x_ref, o_ref = refs
    block_rows, tile_cols = x_ref.shape
    rows = pl.program_id(0) * block_rows + jax.lax.broadcasted_iota(
        jnp.int32, (block_rows, 1), 0
    )
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, tile_cols), 1)
    row_ok = rows < n_rows
    valid = row_ok & (cols < n_cols)
    x = plgpu.load(x_ref, mask=valid, other=0).astype(jnp.float32)
    sig_max = sig_min = None
    if has_clip:
        sig_max = plgpu.load(smax_ref, mask=row_ok, other=1)
        sig_min = plgpu.load(smin_ref, mask=row_ok, other=1)
    rq = C.RowQuant(bits, symmetric, precise_asm)
    scale, zero = rq.row_params(x, valid, sig_max, sig_min)
    y = rq.dequantize(rq.quantize(x, scale, zero), scale, zero, o_ref.dtype)
    plgpu.store(o_ref, y.astype(o_ref.dtype), mask=valid)


@functools.partial(
    jax.jit, static_argnames=("bits", "symmetric", "block_rows", "interpret", "precise_div")
)
def fake_quant_pallas(
    x: jax.Array,
    sig_max: jax.Array | None,
    sig_min: jax.Array | None,
    *,
    bits: int,
    symmetric: bool,
    block_rows: int | None = None,
    interpret: bool = False,
    precise_div: bool | None = None,
) -> jax.Array:
    """Fake-quantize each row of ``x`` ``(rows, d)``; forward only.

    Args:
      x: ``(rows, d)`` float32 / bfloat16 / float16.
      sig_max, sig_min: ``(rows, 1)`` sigmoid of the clipping logits, or both None (no clipping).
      bits: 2..8. symmetric: quantizer kind.
      block_rows: rows per program (power of two); default from the tile size.
      interpret: run the kernel with the Pallas interpreter (CPU).
      precise_div: IEEE float32 division via PTX ``div.rn.f32``; default ``not interpret``.
    """
    C.check_input(x, "fake_quant_pallas")
    if (sig_max is None) != (sig_min is None):
        raise ValueError("pass both clipping factors or neither")
    n_rows, n_cols = x.shape
    tile_cols = C.next_pow2(n_cols)
    if block_rows is None:
        block_rows = C.default_block_rows(n_rows, tile_cols)
    block_rows = C.check_block_rows(block_rows)
    if precise_div is None:
        precise_div = not interpret
    has_clip = sig_max is not None
    tile = pl.BlockSpec((block_rows, tile_cols), lambda i: (i, 0))
    args, in_specs = C.row_tiled_inputs(x, sig_max, sig_min, n_rows=n_rows, block_rows=block_rows,
                                        tile_cols=tile_cols)
    kernel = functools.partial(
        _fake_quant_kernel,
        n_rows=n_rows,
        n_cols=n_cols,
        bits=bits,
        symmetric=symmetric,
        has_clip=has_clip,
        precise_asm=precise_div,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(pl.cdiv(n_rows, block_rows),),
        in_specs=in_specs,
        out_specs=tile,
        interpret=interpret,
        compiler_params=C.compiler_params(block_rows * tile_cols),
        name=f"fake_quant_w{bits}_{'sym' if symmetric else 'asym'}",
    )(*args)
