"""Operands of the split GEMM: per-token activations (int8 or packed 4-bit lanes) and packed
weights with row sums.

Both containers are pytrees (jit-friendly) and hold exactly what the kernel reads:

* :class:`QuantizedActs`: ``x ~= scale[..., None] * (q - zero_point[..., None])``. Asymmetric
  ``b``-bit values ``q`` in ``[0, 2^b)`` are stored shifted to signed, ``q - 2^(b-1)``, and so is
  the zero point: the difference ``q - z`` is unchanged, and an unsigned 8-bit value (up to 255)
  fits the int8 operand of an int8 x int8 -> int32 dot. Two storage formats of the same integers
  (``lane_bits``, static):

  - ``lane_bits=8`` (the default, and A8): ``qvalue`` int8 ``(..., K)``, one value per byte.
  - ``lane_bits=4`` (A4, A3, A2: :func:`act_lane_bits`): ``qvalue`` uint8 ``(..., ceil(K / 2))``,
    two signed 4-bit lanes per byte in the layout of :mod:`splitq_jax.packing`
    (``packing.pack(q, 4, uint8, signed=True)``: value ``2j`` in the low nibble of byte ``j``,
    ``2j + 1`` in the high nibble, an odd ``K`` padded with a zero lane); ``k`` holds ``K``. The
    shifted signed values of every width ``b <= 4`` lie in ``[-2^(b-1), 2^(b-1))``, so a signed
    4-bit lane holds them exactly and unpacks (left shift to the top of the byte, arithmetic right
    shift) to the very int8 the int8 format stores: the GEMM integers are identical. Half the bytes
    of the int8 format cross HBM between the activation kernel and the GEMM (``K / 2`` per token,
    plus 4 bytes of scale and, asymmetric, 4 of zero point).

    Why 3- and 2-bit values use 4-bit lanes rather than denser packing: 3-bit values have no
    power-of-two packing (10 per uint32 or 8 per 3 bytes are not Triton tiles, see
    :mod:`splitq_jax.packing`); 2-bit lanes (4 per byte) would save another ``K / 4`` bytes at A2
    only, at the price of a second lane width in both kernels and a stricter condition for the
    activation kernel's in-kernel packing (the Kronecker column count must be a multiple of 4, not
    2). The lane width is a field, so a 2-bit lane format can be added without changing the GEMM's
    unpacking (the same shift pair as the 2-bit weights).
* :class:`GemmWeight`: a symmetric per-output-channel :class:`~splitq_jax.packing.PackedTensor`
  (``W ~= scale[:, None] * q``) plus ``row_sum = sum_k q`` (int32), computed once when the weight
  is prepared, because an asymmetric activation needs it:
  ``sum_k (q_x - z_x) q_w = q_x . q_w - z_x * row_sum``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import packing, quant

TERMS = ("cws", "mac", "text", "vision")  # auxiliary terms, in the order they are added


@dataclasses.dataclass(frozen=True)
class QuantizedActs:
    """Per-token quantized activations ``(..., K)`` (see the module docstring for the formats).

    Leaves:
      qvalue: ``(..., K)`` int8 (``lane_bits=8``) or ``(..., ceil(K / 2))`` uint8 of two signed
        4-bit lanes (``lane_bits=4``); signed values, asymmetric ones shifted by ``-2^(b-1)``.
      scale: ``(...)`` float32.
      zero_point: ``(...)`` int32 in the same shifted domain, or None (symmetric).
    Static: ``lane_bits`` (8 or 4) and ``k`` (``K``; None for ``lane_bits=8``, where it is
    ``qvalue.shape[-1]``).
    """

    qvalue: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    lane_bits: int = 8
    k: int | None = None

    @property
    def width(self) -> int:
        """``K``, the number of values per token."""
        return int(self.qvalue.shape[-1]) if self.k is None else int(self.k)

    @property
    def packed(self) -> bool:
        return self.lane_bits != 8

    def values(self) -> jax.Array:
        """The int8 values ``(..., K)`` (the ``lane_bits=8`` qvalue; unpacked lanes otherwise)."""
        if not self.packed:
            return self.qvalue
        q = packing.unpack(self.qvalue, self.lane_bits, self.width, "uint8", signed=True)
        return q.astype(jnp.int8)


jax.tree_util.register_dataclass(
    QuantizedActs, data_fields=["qvalue", "scale", "zero_point"], meta_fields=["lane_bits", "k"]
)

LANE_BITS = (8, 4)  # storage formats of QuantizedActs


def act_lane_bits(bits: int) -> int:
    """Lane width of the packed format for ``bits``-wide activations: 8 (int8) for 5..8 bits,
    4 for 2..4 bits (see the module docstring)."""
    quant.check_bits(bits)
    return 8 if bits > 4 else 4


def pack_acts(a: QuantizedActs, lane_bits: int = 4) -> QuantizedActs:
    """The same integers in ``lane_bits`` lanes (int8 -> packed, or packed -> int8 with 8).

    Values must fit the lanes (``lane_bits=4``: ``[-8, 8)``, i.e. activations of at most 4 bits);
    checked when concrete (see :func:`splitq_jax.packing.pack`).
    """
    if lane_bits not in LANE_BITS:
        raise ValueError(f"lane_bits must be one of {LANE_BITS}, got {lane_bits!r}")
    if lane_bits == a.lane_bits:
        return a
    q = a.values()
    if lane_bits == 8:
        return QuantizedActs(q, a.scale, a.zero_point)
    words = packing.pack(q, lane_bits, jnp.uint8, signed=True)
    return QuantizedActs(words, a.scale, a.zero_point, lane_bits, int(q.shape[-1]))


def quantized_acts(
    p: quant.QParams, bits: int, symmetric: bool, *, packed: bool = False
) -> QuantizedActs:
    """Convert the output of :func:`splitq_jax.quant.quantize` (no groups) to GEMM operands:
    int8, or with ``packed`` the format of :func:`act_lane_bits` (4-bit lanes up to 4 bits)."""
    quant.check_bits(bits)
    q = jnp.asarray(p.qvalue, jnp.int32)
    scale = jnp.asarray(p.scale, jnp.float32)[..., 0]
    if symmetric:
        a = QuantizedActs(q.astype(jnp.int8), scale, None)
    else:
        shift = 1 << (bits - 1)
        zero = jnp.asarray(p.zero_point, jnp.int32)[..., 0] - shift
        a = QuantizedActs((q - shift).astype(jnp.int8), scale, zero)
    return pack_acts(a, act_lane_bits(bits)) if packed else a


def quantize_acts(
    x: jax.Array,
    bits: int,
    *,
    symmetric: bool = True,
    clip: dict[str, jax.Array] | None = None,
    packed: bool = False,
) -> QuantizedActs:
    """Per-token quantization of ``x`` ``(..., K)`` (:func:`splitq_jax.quant.quantize`)."""
    return quantized_acts(quant.quantize(x, bits, symmetric=symmetric, clip=clip), bits, symmetric,
                          packed=packed)


@dataclasses.dataclass(frozen=True)
class GemmWeight:
    """A packed weight ``(N, K)`` ready for the split GEMM.

    Leaves:
      qvalue: ``(N, ceil(K / c))`` uint8 or uint32 words, signed ``bits``-wide values, the layout
        of :mod:`splitq_jax.packing`.
      scale: ``(N,)`` float32 per output channel.
      row_sum: ``(N,)`` int32, ``sum_k q[n, k]``.
    Static: ``bits`` (2, 3, 4 or 8: 5- to 7-bit weights are stored as 8-bit), ``k`` (= K),
    ``word_dtype`` (``"uint8"`` or ``"uint32"``).
    """

    qvalue: jax.Array
    scale: jax.Array
    row_sum: jax.Array
    bits: int
    k: int
    word_dtype: str

    @property
    def n(self) -> int:
        return int(self.qvalue.shape[0])


jax.tree_util.register_dataclass(
    GemmWeight, data_fields=["qvalue", "scale", "row_sum"], meta_fields=["bits", "k", "word_dtype"]
)


def gemm_weight(t: packing.PackedTensor) -> GemmWeight:
    """Prepare a stored weight (as :func:`splitq_jax.quantized.fold.pack_weight` makes it) for the GEMM.

    Raises for what the split GEMM does not take: asymmetric weights (a weight zero point would
    need per-token sums of the activations), per-group scales (``group_size``; the epilogue
    applies one scale per output channel) and anything but a 2-D ``(N, K)`` weight.
    """
    if not isinstance(t, packing.PackedTensor):
        raise TypeError(f"gemm_weight() takes a PackedTensor, got {type(t).__name__}")
    if len(t.shape) != 2:
        raise ValueError(f"a GEMM weight is (d_out, d_in), got shape {t.shape}")
    if not t.symmetric or t.zero_point is not None:
        raise ValueError("split_gemm takes symmetric weights only (w_symmetric=True)")
    if t.group_size is not None:
        raise ValueError(
            f"split_gemm takes per-output-channel weight scales, not groups of {t.group_size}"
        )
    q = packing.unpack(t.qvalue, t.bits, t.shape[-1], t.word_dtype, signed=True)
    return GemmWeight(
        qvalue=t.qvalue,
        scale=jnp.asarray(t.scale, jnp.float32),
        row_sum=jnp.sum(q, axis=-1, dtype=jnp.int32),
        bits=t.bits,
        k=int(t.shape[-1]),
        word_dtype=t.word_dtype,
    )


def folded_weights(weights: dict[str, Any]) -> dict[str, GemmWeight]:
    """GEMM weights of one folded linear (a folded group's ``["weights"][name]``, :mod:`splitq_jax.quantized.schema`).

    ``{"main": ..., "cws": ..., "mac": ..., "text": ..., "vision": ...}`` (present ones only); a
    branch contributes its up-projection ``l_out`` ``(d_out, r)``; its down-projection ``l_in``
    runs before the GEMM, where the activations are quantized.
    """
    out = {"main": gemm_weight(weights["main"])}
    for name in TERMS:
        if name in weights:
            w = weights[name]
            out[name] = gemm_weight(w["l_out"] if isinstance(w, dict) else w)
    return out


def check_operands(
    x: QuantizedActs,
    w: GemmWeight,
    terms: dict[str, tuple[QuantizedActs, GemmWeight]],
    text_mask: jax.Array | None,
    bias: jax.Array | None,
) -> None:
    """Shape and dtype checks shared by every implementation."""
    rows = tuple(x.qvalue.shape[:-1])
    n = w.n
    for name, (a, b) in (("main", (x, w)), *terms.items()):
        if not isinstance(a, QuantizedActs) or not isinstance(b, GemmWeight):
            raise TypeError(f"{name}: expected (QuantizedActs, GemmWeight)")
        if a.lane_bits == 8:
            if a.qvalue.dtype != jnp.int8:
                raise ValueError(f"{name}: activations must be int8, got {a.qvalue.dtype}")
            if a.k is not None and a.k != a.qvalue.shape[-1]:
                raise ValueError(f"{name}: int8 activations of K={a.k} have {a.qvalue.shape[-1]}")
        elif a.lane_bits == 4:
            if a.qvalue.dtype != jnp.uint8:
                raise ValueError(
                    f"{name}: packed 4-bit activations must be uint8 words, got {a.qvalue.dtype}"
                )
            if a.k is None or a.qvalue.shape[-1] != -(-a.k // 2):
                raise ValueError(
                    f"{name}: {a.qvalue.shape[-1]} bytes of 4-bit lanes do not hold K={a.k}"
                )
        else:
            raise ValueError(f"{name}: activations of lane_bits={a.lane_bits}: use {LANE_BITS}")
        if tuple(a.qvalue.shape[:-1]) != rows:
            raise ValueError(
                f"{name}: activations have rows {tuple(a.qvalue.shape[:-1])}, main has {rows}"
            )
        if a.width != b.k:
            raise ValueError(f"{name}: activations have K={a.width}, weight K={b.k}")
        if tuple(a.scale.shape) != rows or (
            a.zero_point is not None and tuple(a.zero_point.shape) != rows
        ):
            raise ValueError(f"{name}: activation scale / zero point must have shape {rows}")
        if b.n != n:
            raise ValueError(f"{name}: weight has {b.n} output channels, main has {n}")
        if b.bits not in packing.SUPPORTED_BITS:
            raise ValueError(f"{name}: unsupported weight bits {b.bits}")
        if b.qvalue.shape != (n, packing.packed_length(b.k, b.bits, b.word_dtype)):
            raise ValueError(f"{name}: packed words of shape {b.qvalue.shape} do not hold K={b.k}")
    if "mac" in terms and text_mask is None:
        raise ValueError("the MAC term applies to text tokens only: pass text_mask")
    if text_mask is not None and tuple(text_mask.shape) != rows:
        raise ValueError(f"text_mask must have shape {rows}, got {tuple(text_mask.shape)}")
    if bias is not None and tuple(np.shape(bias)) != (n,):
        raise ValueError(f"bias must have shape {(n,)}, got {tuple(np.shape(bias))}")
