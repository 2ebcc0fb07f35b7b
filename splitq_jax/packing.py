"""Lossless bit packing of low-bit integers into ``uint8`` / ``uint32`` words.

XLA on CPU rejects int4 dots and low-bit dtypes are not portable across backends, so quantized
tensors are stored as packed words and unpacked with shifts and masks inside kernels.

Layout (one rule for every width): a word of ``W`` bits (8 or 32) holds
``c = W // b`` values of ``b`` bits, little-endian: value ``k`` of the word sits in bits
``[k*b, (k+1)*b)``, and value ``j`` of a row lives in word ``j // c``, slot ``j % c``.
Packing runs along the *last* axis; it is padded with zeros up to a whole number of words and
``unpack`` trims it back to ``n``.

=====  ===========  ============  =====================================
bits   uint8 words  uint32 words  bits stored per value (uint8 / uint32)
=====  ===========  ============  =====================================
2      4 per byte   16 per word   2 / 2
3      2 per byte   10 per word   4 / 3.2   (+33 % / +6.7 %)
4      2 per byte   8 per word    4 / 4
8      1 per byte   4 per word    8 / 8
=====  ===========  ============  =====================================

(plus zero padding of each row up to a whole word).

3-bit choice: values never straddle a word. A kernel unpacks slot ``k`` of any word with one
shift and one mask (``(w >> 3k) & 7``), exactly as for the other widths, with no loads of a
neighbouring byte/word and no per-slot special case; the unused top bits (2 of 8 or 2 of 32) are
zero. Use ``uint32`` words for 3-bit tensors that should be stored densely (6.7 % overhead);
``uint8`` keeps every byte self-contained and power-of-two tiles of values map to power-of-two
tiles of bytes (128 values -> 64 bytes), at 33 % overhead. A 24-bit bit-stream (8 values per
3 bytes) was not chosen: it is dense but slots straddle bytes and tiles are multiples of 3 bytes,
which Triton block shapes (powers of two) do not express.

Signed values (symmetric quantizers, ``[-2^(b-1), 2^(b-1))``) are stored as their two's-complement
low ``b`` bits and sign-extended on unpack with a left shift to the top of an int32 followed by an
arithmetic right shift, as a GPU kernel would.

Range checks on the input integers run only when the values are concrete (outside ``jax.jit`` /
other transformations); under tracing out-of-range values are silently masked to their low bits.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax.quant import QParams, qrange, saturate

SUPPORTED_BITS = (2, 3, 4, 8)
WORD_DTYPES = ("uint8", "uint32")


# ----------------------------------------------------------------------------- validation


def _check_bits(bits) -> int:
    is_int = isinstance(bits, (int, np.integer)) and not isinstance(bits, bool)
    if not is_int or int(bits) not in SUPPORTED_BITS:
        raise ValueError(
            f"cannot pack bit width {bits!r}: supported widths are {SUPPORTED_BITS} "
            "(store 5- to 7-bit integers with bits=8)"
        )
    return int(bits)


def _word_dtype(word_dtype) -> np.dtype:
    try:
        dt = np.dtype(word_dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in WORD_DTYPES:
        raise ValueError(f"unsupported word dtype {word_dtype!r}: use one of {WORD_DTYPES}")
    return dt


def values_per_word(bits: int, word_dtype=jnp.uint8) -> int:
    """How many ``bits``-wide values one word holds (``word_bits // bits``)."""
    return _word_dtype(word_dtype).itemsize * 8 // _check_bits(bits)


def packed_length(n: int, bits: int, word_dtype=jnp.uint8) -> int:
    """Number of words that hold ``n`` values (the last axis after packing)."""
    return -(-n // values_per_word(bits, word_dtype))


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_range(found: tuple[int, int], bits: int, signed: bool, what: str = "values") -> None:
    """Raise if the observed ``(min, max)`` leaves the ``bits``-wide range."""
    lo, hi = qrange(bits, signed)
    qmin, qmax = found
    if qmin < lo or qmax > hi:
        kind = "signed" if signed else "unsigned"
        raise ValueError(
            f"{what} out of range for {kind} {bits}-bit packing: found [{qmin}, {qmax}], "
            f"allowed [{lo}, {hi}]"
        )


# One compiled kernel per (shape, bits, word, ...) instead of a dispatch per op in eager use;
# inside an outer jit these inline.
@functools.partial(jax.jit, static_argnames=("bits", "c", "word"))
def _pack_words(q: jax.Array, bits: int, c: int, word: str) -> tuple[jax.Array, ...]:
    """Words, plus min and max of ``q`` for the range check (dead code under an outer jit)."""
    n = q.shape[-1]
    n_words = -(-n // c)
    # int32 holds every input value; & mask keeps the two's-complement low bits of negatives.
    low = jnp.bitwise_and(q.astype(jnp.int32), (1 << bits) - 1).astype(jnp.uint32)
    low = jnp.pad(low, [(0, 0)] * (q.ndim - 1) + [(0, n_words * c - n)])
    low = low.reshape(*q.shape[:-1], n_words, c)
    shifts = jnp.arange(c, dtype=jnp.uint32) * jnp.uint32(bits)
    # Slots occupy disjoint bits, so the sum is a bitwise OR and cannot overflow 32 bits.
    words = jnp.sum(jnp.left_shift(low, shifts), axis=-1, dtype=jnp.uint32)
    if q.size == 0:
        return words.astype(word), jnp.int32(0), jnp.int32(0)
    return words.astype(word), jnp.min(q), jnp.max(q)


@functools.partial(jax.jit, static_argnames=("bits", "c", "n", "signed"))
def _unpack_words(packed: jax.Array, bits: int, c: int, n: int, signed: bool) -> jax.Array:
    shifts = jnp.arange(c, dtype=jnp.uint32) * jnp.uint32(bits)
    w = packed.astype(jnp.uint32)[..., None]
    vals = jnp.bitwise_and(jnp.right_shift(w, shifts), jnp.uint32((1 << bits) - 1))
    vals = vals.reshape(*packed.shape[:-1], packed.shape[-1] * c)[..., :n].astype(jnp.int32)
    if signed:
        # Sign-extend: move the value's top bit to bit 31, then shift back arithmetically.
        s = jnp.int32(32 - bits)
        vals = jnp.right_shift(jnp.left_shift(vals, s), s)
    return vals


# ----------------------------------------------------------------------------- pack / unpack


def pack(q: jax.Array, bits: int, word_dtype=jnp.uint8, *, signed: bool = False) -> jax.Array:
    """Pack integers along the last axis into words.

    Args:
      q: integer array ``(..., n)``; unsigned values in ``[0, 2^b)`` or, with ``signed=True``,
        values in ``[-2^(b-1), 2^(b-1))``. Checked when concrete.
      bits: 2, 3, 4 or 8.
      word_dtype: ``jnp.uint8`` or ``jnp.uint32``.
      signed: whether ``q`` is two's-complement signed (only affects the range check; the low
        ``b`` bits are stored either way).
    Returns:
      ``(..., ceil(n / c))`` array of ``word_dtype``, ``c = values_per_word(bits, word_dtype)``.
    """
    bits = _check_bits(bits)
    wdt = _word_dtype(word_dtype)
    if not isinstance(q, (jax.Array, np.ndarray)):
        q = np.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.integer):
        raise ValueError(f"pack() needs an integer array, got dtype {q.dtype}")
    if q.ndim == 0:
        raise ValueError("pack() needs at least one axis (it packs the last one)")
    on_host = isinstance(q, np.ndarray)
    if on_host and q.size:  # check before the int32 conversion on the way to the device
        _check_range((int(q.min()), int(q.max())), bits, signed)
    words, qmin, qmax = _pack_words(q, bits, wdt.itemsize * 8 // bits, wdt.name)
    if not on_host and _is_concrete(words) and q.size:
        _check_range((int(qmin), int(qmax)), bits, signed)
    return words


def unpack(
    packed: jax.Array, bits: int, n: int, word_dtype=None, *, signed: bool = False
) -> jax.Array:
    """Inverse of :func:`pack`: ``(..., ceil(n / c))`` words -> ``(..., n)`` int32 values.

    ``word_dtype`` defaults to ``packed.dtype``; if given it must match it.
    """
    bits = _check_bits(bits)
    packed = jnp.asarray(packed)
    if word_dtype is None:
        word_dtype = packed.dtype
    wdt = _word_dtype(word_dtype)
    if packed.dtype != wdt:
        raise ValueError(f"packed words have dtype {packed.dtype}, expected {wdt.name}")
    if packed.ndim == 0:
        raise ValueError("unpack() needs at least one axis of words")
    c = wdt.itemsize * 8 // bits
    if not isinstance(n, (int, np.integer)) or n < 0 or packed.shape[-1] != -(-n // c):
        raise ValueError(
            f"{packed.shape[-1]} words of {c} {bits}-bit values cannot hold exactly n={n!r} values "
            f"(need {-(-int(n) // c) if isinstance(n, (int, np.integer)) else '?'} words)"
        )
    return _unpack_words(packed, bits, c, int(n), bool(signed))


# ----------------------------------------------------------------------------- packed tensors


@dataclasses.dataclass(frozen=True)
class PackedTensor:
    """A quantized tensor as stored: ``x ~= scale * (unpack(qvalue) - zero_point)``.

    Leaves:
      qvalue: ``shape[:-1] + (packed_length(shape[-1]),)`` words; the last axis is packed whole
        (groups are contiguous runs of ``group_size`` values of it, not padded individually).
      scale: ``shape[:-1]`` per row, or ``shape[:-1] + (shape[-1] // group_size,)`` per group.
      zero_point: ``uint8`` of ``scale``'s shape (asymmetric), or ``None`` (symmetric, z = 0).
    Static metadata: ``bits``, ``shape`` (unpacked), ``symmetric``, ``group_size``, ``word_dtype``
    (its name, ``"uint8"`` or ``"uint32"``).
    """

    qvalue: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    bits: int
    shape: tuple[int, ...]
    symmetric: bool
    group_size: int | None
    word_dtype: str


jax.tree_util.register_dataclass(
    PackedTensor,
    data_fields=["qvalue", "scale", "zero_point"],
    meta_fields=["bits", "shape", "symmetric", "group_size", "word_dtype"],
)


def _grouped_shape(shape: tuple[int, ...], group_size: int | None) -> tuple[int, ...]:
    if group_size is None:
        return shape
    d = shape[-1]
    is_int = isinstance(group_size, (int, np.integer)) and not isinstance(group_size, bool)
    if not is_int or group_size <= 0 or d % group_size:
        raise ValueError(f"group_size {group_size!r} does not divide the last axis ({d})")
    return (*shape[:-1], d // group_size, int(group_size))


def pack_quantized(
    p: QParams,
    bits: int,
    symmetric: bool,
    shape: tuple[int, ...],
    group_size: int | None = None,
    word_dtype=jnp.uint8,
    scale_dtype=jnp.float32,
) -> PackedTensor:
    """Pack the output of :func:`splitq_jax.quant.quantize` for storage.

    Args:
      p: ``QParams`` with int32 ``qvalue`` of the grouped shape and ``scale`` / ``zero_point``
        with a trailing singleton axis, as ``quantize`` returns them.
      bits, symmetric, group_size: the settings ``quantize`` was called with.
      shape: the unquantized tensor's shape.
      word_dtype: ``jnp.uint8`` or ``jnp.uint32``.
      scale_dtype: storage dtype of the scales; ``float32`` (default) makes
        :func:`unpack_dequantize` bit-identical to ``dequantize``.
    """
    bits = _check_bits(bits)
    wdt = _word_dtype(word_dtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("pack_quantized() needs a tensor with at least one axis")
    gshape = _grouped_shape(shape, group_size)
    stat_shape = gshape[:-1] + (1,)
    if tuple(p.qvalue.shape) != gshape:
        raise ValueError(
            f"qvalue has shape {tuple(p.qvalue.shape)}, expected {gshape} "
            f"for shape={shape}, group_size={group_size}"
        )
    for name in ("scale", "zero_point"):
        got = tuple(jnp.shape(getattr(p, name)))
        if got != stat_shape:
            raise ValueError(f"{name} has shape {got}, expected {stat_shape}")
    if symmetric:
        zp = None
        z = p.zero_point
        if _is_concrete(z) and np.any(np.asarray(z) != 0):  # small: one value per row/group
            raise ValueError("symmetric quantizer with a nonzero zero_point")
    else:
        zp = jnp.asarray(p.zero_point)[..., 0]
        if _is_concrete(zp) and zp.size:
            zn = np.asarray(zp)  # small: one value per row/group
            _check_range((int(zn.min()), int(zn.max())), bits, False, what="zero_point")
        zp = zp.astype(jnp.uint8)
    words = pack(jnp.asarray(p.qvalue).reshape(shape), bits, wdt, signed=symmetric)
    scale = jnp.asarray(p.scale)[..., 0].astype(scale_dtype)
    return PackedTensor(
        qvalue=words,
        scale=scale,
        zero_point=zp,
        bits=bits,
        shape=shape,
        symmetric=bool(symmetric),
        group_size=None if group_size is None else int(group_size),
        word_dtype=wdt.name,
    )


@functools.partial(jax.jit, static_argnames=("dtype",))
def unpack_dequantize(t: PackedTensor, dtype=jnp.float32) -> jax.Array:
    """``scale * (q - zero_point)`` of shape ``t.shape`` (saturated to ``dtype``'s range, as
    :func:`splitq_jax.quant.dequantize`); equals ``dequantize(p, shape, dtype)`` exactly when the
    scales were stored in float32."""
    q = unpack(t.qvalue, t.bits, t.shape[-1], t.word_dtype, signed=t.symmetric)
    q = q.reshape(_grouped_shape(t.shape, t.group_size))
    if t.zero_point is not None:
        q = q - t.zero_point.astype(jnp.int32)[..., None]
    x = saturate(q.astype(jnp.float32) * t.scale.astype(jnp.float32)[..., None], dtype)
    return x.reshape(t.shape).astype(dtype)


def nbytes(t: PackedTensor) -> int:
    """Bytes stored by ``t``: packed words + scales + zero points (if any)."""
    leaves = (t.qvalue, t.scale, t.zero_point)
    return sum(int(a.size) * a.dtype.itemsize for a in leaves if a is not None)
