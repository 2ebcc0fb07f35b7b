"""Pieces shared by the row-quantization kernels (fake-quant, quantize-and-pack).

The kernels reproduce :mod:`splitq_jax.quant` *bit for bit*. :class:`RowQuant` runs the very
helpers ``quant.fake_quant`` is built from (``scale_from_stats``, ``times_reciprocal``, ``saturate``:
plain ``jnp`` that Pallas lowers as it is), in float32 as the reference does for every input
dtype; it replaces only what the Pallas Triton backend lowers differently from XLA:

* ``jnp.round`` (ties to even): Triton has no ``round`` primitive. :func:`round_half_even` rebuilds
  it from ``floor`` with a parity fix (exact, including ties and the sign of zero).
* the one float32 division, the reciprocal ``fl(4 / s)`` (per row; per column of the branch
  segments in act_pack): Triton lowers ``/`` to ``div.full.f32`` (up to 2 ulp off), while XLA
  divides with IEEE rounding. In a compiled (non-interpret) kernel :func:`div` uses the PTX
  instruction ``div.rn.f32`` through inline assembly; interpret mode divides with XLA as the
  reference does. (Every other division of the quantizer is, by definition, a product with that
  reciprocal or with the constant ``fl(1 / q_max)``: see :mod:`splitq_jax.quant`.)

Block shapes: Triton needs power-of-two tiles, so a row of ``d`` values is processed as a
``next_pow2(d)``-wide tile with masked loads and stores; ragged row counts are masked the same way
(the Triton backend does not mask out-of-bounds blocks by itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from splitq_jax import quant
from splitq_jax.quant import qrange

IMPLEMENTATIONS = ("xla", "pallas")
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Elements of one (block_rows, next_pow2(d)) tile that a program keeps live (float32: 32 KiB).
# Triton 3.9 + ptxas for sm_90, 8 warps (compiled offline, not timed on a GPU yet): a 4 x 4096
# float32 fake-quant tile takes 172 registers per thread, 2 x 4096 takes 72; no spills either way.
TILE_ELEMENTS = 8192


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def resolve_implementation(implementation: str | None) -> str:
    """``None`` -> ``"pallas"`` on GPU, ``"xla"`` elsewhere; otherwise validate the name."""
    if implementation is None:
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}: use one of {IMPLEMENTATIONS} or None"
        )
    return implementation


def resolve_interpret(interpret: bool | None) -> bool:
    """Interpret mode unless running on a GPU (Pallas has no CPU backend)."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def default_block_rows(n_rows: int, tile_cols: int) -> int:
    """Power-of-two rows per program: a ~``TILE_ELEMENTS`` tile, no more rows than exist."""
    cap = max(1, TILE_ELEMENTS // tile_cols)
    return max(1, min(next_pow2(n_rows), 1 << (cap.bit_length() - 1)))


def check_block_rows(block_rows) -> int:
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows <= 0:
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
    if block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two (Triton tiles), got {block_rows}")
    return block_rows


def check_input(x: jax.Array, what: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{what} takes a (rows, d) matrix, got shape {x.shape}")
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{what}: unsupported dtype {x.dtype} (float32, bfloat16 or float16)")


def compiler_params(tile_elements: int) -> plgpu.CompilerParams:
    """Triton parameters (passing them selects the Triton backend, not Mosaic GPU)."""
    return plgpu.CompilerParams(num_warps=4 if tile_elements <= 4096 else 8, num_stages=1)


def clip_factors(clip, row_shape: tuple[int, ...]):
    """``sigmoid`` of the clipping logits, broadcast to ``(rows, 1)`` (rows = prod(row_shape)).

    Computed outside the kernel with the same XLA op as the reference, so the values agree.
    """
    if clip is None:
        return None, None
    n = int(np.prod(row_shape, dtype=np.int64))
    out = []
    for key in ("max", "min"):
        sig = jax.nn.sigmoid(jnp.asarray(clip[key]))
        try:
            sig = jnp.broadcast_to(sig, row_shape)
        except ValueError as e:
            raise ValueError(
                f"clip[{key!r}] of shape {jnp.shape(clip[key])} does not broadcast to the rows "
                f"{row_shape}; the Pallas kernels take per-row (or scalar) clipping logits"
            ) from e
        out.append(sig.reshape(n, 1))
    return tuple(out)


# ----------------------------------------------------------------------------- in-kernel math


def round_half_even(t: jax.Array) -> jax.Array:
    """``jnp.round`` (ties to even) of float32 ``t`` from ``floor``; exact for every value.

    ``t - floor(t)`` is exact (both lie on the binade's ulp grid), ``floor(t) * 0.5`` is exact, and
    a zero result takes the sign of ``t`` as ``jnp.round`` does (``round(-0.3) == -0.0``).
    """
    f = jnp.floor(t)
    frac = t - f
    odd = (f - 2.0 * jnp.floor(f * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    r = jnp.where(up, f + 1.0, f)
    return jnp.where(r == 0.0, t * 0.0, r)  # signed zero, as rint


def div(a: jax.Array, b: jax.Array, precise_asm: bool) -> jax.Array:
    """float32 ``a / b`` with IEEE rounding on every backend (see the module docstring)."""
    if not precise_asm:
        return a / b
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    (q,) = plgpu.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape)],
        constraints="=f,f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)],
    )
    return q


def round_to(v: jax.Array, dtype, interpret: bool) -> jax.Array:
    """Round float32 ``v`` to ``dtype``'s precision, keeping float32 (a no-op for float32).

    In interpret mode XLA would fold a plain ``f32 -> bf16 -> f32`` convert pair away (excess
    precision), so the rounding is a ``reduce_precision`` there; Triton keeps the converts.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return v
    if interpret:
        fi = jnp.finfo(dtype)
        return jax.lax.reduce_precision(v, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
    return v.astype(dtype).astype(jnp.float32)


class RowQuant:
    """Per-row quantizer inside a kernel: :mod:`splitq_jax.quant`'s float32 arithmetic op by op.

    Inputs and outputs are float32 tiles: statistics ``(rows, 1)``, values ``(rows, cols)``.
    """

    def __init__(self, bits: int, symmetric: bool, precise_asm: bool):
        self.bits = bits
        self.symmetric = symmetric
        self.precise_asm = precise_asm

    def recip4(self, scale):
        """``fl(4 / scale)``, IEEE on every backend (``quant.times_reciprocal`` takes it)."""
        return quant.scale_recip4(scale, lambda a, b: div(a, b, self.precise_asm))

    def params(self, xmax, xmin, sig_max=None, sig_min=None):
        """``quant``'s scale and zero point from the row max/min (``(rows, 1)``): ``(scale, zero)``."""
        if sig_max is not None:
            xmax = sig_max.astype(jnp.float32) * xmax
            xmin = sig_min.astype(jnp.float32) * xmin
        if not self.symmetric:
            # Zero stays inside the range so that exact zeros stay exact (as quant.py).
            xmax = jnp.maximum(xmax, 0.0)
            xmin = jnp.minimum(xmin, 0.0)
        scale = quant.scale_from_stats(xmax, xmin, self.bits, self.symmetric)
        if self.symmetric:
            zero = jnp.zeros_like(scale)
        else:
            zero = round_half_even(quant.times_reciprocal(-xmin, self.recip4(scale)))
        return scale, zero

    def row_params(self, x, valid, sig_max=None, sig_min=None):
        """Row max/min of a float32 tile (entries outside ``valid`` ignored), then ``params``."""
        xmax = jnp.max(jnp.where(valid, x, -jnp.inf), axis=-1, keepdims=True)
        xmin = jnp.min(jnp.where(valid, x, jnp.inf), axis=-1, keepdims=True)
        return self.params(xmax, xmin, sig_max, sig_min)

    def quantize(self, x, scale, zero):
        """``clip(round(x / scale) + zero, q_min, q_max)`` as float32 integers; ``scale`` and
        ``zero`` broadcast against ``x`` (per row, or per column segment)."""
        q_min, q_max = qrange(self.bits, self.symmetric)
        t = round_half_even(quant.times_reciprocal(x, self.recip4(scale)))
        return jnp.clip(t + zero, float(q_min), float(q_max))

    def dequantize(self, q, scale, zero, dtype):
        """``(q - zero) * scale`` saturated to ``dtype``'s range (still float32: the caller's store
        rounds it to ``dtype``, as the reference's final cast does)."""
        return quant.saturate((q - zero) * scale, dtype)


def pack_slots(q: jax.Array, bits: int, per_word: int, word_dtype) -> jax.Array:
    """Pack int32 values ``(..., w)`` into ``(..., w / per_word)`` words of ``word_dtype``, the
    layout of :func:`splitq_jax.packing.pack`: value ``k`` of a word in bits ``[k*b, (k+1)*b)``
    (two's-complement low bits, so signed values pack as ``pack(..., signed=True)`` does).

    Reshapes the tile to ``(..., w / per_word, per_word)`` and sums the shifted slots (disjoint
    bits: the sum is an OR). ``w`` must be a multiple of ``per_word``; entries that should be
    padding must already be zero.
    """
    low = jnp.bitwise_and(q.astype(jnp.int32), jnp.int32((1 << bits) - 1)).astype(jnp.uint32)
    low = low.reshape(*q.shape[:-1], q.shape[-1] // per_word, per_word)
    shifts = jax.lax.broadcasted_iota(jnp.uint32, (1,) * q.ndim + (per_word,), q.ndim)
    words = jnp.sum(jnp.left_shift(low, shifts * jnp.uint32(bits)), axis=-1, dtype=jnp.uint32)
    return words.astype(word_dtype)


def row_tiled_inputs(x, sig_max, sig_min, *, n_rows: int, block_rows: int, tile_cols: int):
    """Operands and BlockSpecs of a kernel tiled over rows: one ``(block_rows, tile_cols)`` tile of
    ``x`` per program, plus the per-row clipping factors ``(n_rows, 1)`` when given."""
    args, in_specs = [x], [pl.BlockSpec((block_rows, tile_cols), lambda i: (i, 0))]
    if sig_max is not None:
        for s in (sig_max, sig_min):
            if s.shape != (n_rows, 1):
                raise ValueError(f"clipping factors must have shape {(n_rows, 1)}, got {s.shape}")
        row_spec = pl.BlockSpec((block_rows, 1), lambda i: (i, 0))
        args += [sig_max, sig_min]
        in_specs += [row_spec, row_spec]
    return args, in_specs
